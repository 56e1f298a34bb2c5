"""How much of the shapes world the codes carry: shape kind of each held-out object, recovered from the codes of
the patches its bounding box touches (a bag of codes), by a linear probe and by a per-code majority vote, both fitted
on the train split's objects. Chance is 1/3 (three kinds); the codes' colour alone says nothing about the kind.

A linear (multinomial logistic) probe on the bag is what "the codes carry shape" means for the backbone, which sees
nothing but code ids: it must tell a triangle from a square by which codes the object's patches get.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline import shapes
from data_pipeline.image_tokenizer.prepare import prepare_pixels
from data_pipeline.image_tokenizer.raw_images import iter_raw_images


def object_bags(model, dcfg, split_dir: Path, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bags [objects, codebook] code counts over each object's patches, the code of the patch holding its centre
    [objects], kind index [objects]) for the shapes
    scenes of a split, each scene once, tokenized as prompt images (understanding mode, as pretokenize does)."""
    icfg, p, k = dcfg.image_tokenizer, model.patch_size, model.codebook_size
    scenes, pixels = [], []
    for _, img, meta in iter_raw_images(split_dir, dcfg, dedupe=True):
        if meta.get("source") != "shapes" or img.size != (meta["scene"]["image_size"],) * 2:
            continue
        px = prepare_pixels(img, model, icfg, "understand")
        if px.shape[-1] != img.size[0]:  # resized: the scene's pixel boxes no longer apply
            continue
        scenes.append(shapes.Scene.from_json(meta["scene"]))
        pixels.append(px)
        if limit is not None and len(scenes) >= limit:
            break
    bags, centres, kinds = [], [], []
    for scene, ids in zip(scenes, model.encode_images(pixels, icfg.batch_size)):
        gh, gw = ids.shape
        for s in scene.shapes:
            x0, y0, x1, y1 = s.bbox()
            rows = range(max(0, int(y0 // p)), min(gh, int(-(-y1 // p))))
            cols = range(max(0, int(x0 // p)), min(gw, int(-(-x1 // p))))
            codes = ids[rows.start:rows.stop, cols.start:cols.stop].flatten()
            bags.append(torch.bincount(codes, minlength=k).float())
            centres.append(ids[min(gh - 1, int(s.cy // p)), min(gw - 1, int(s.cx // p))])
            kinds.append(shapes.KINDS.index(s.kind))
    if not bags:
        return torch.zeros(0, k), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.stack(bags), torch.stack(centres).long(), torch.tensor(kinds)


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300, seed: int = 0) -> torch.nn.Linear:
    """Multinomial logistic regression on code frequencies (full batch Adam, small L2): deterministic and seconds."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-4)
    xf = x / x.sum(1, keepdim=True).clamp(min=1)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(lin(xf), y).backward()
            opt.step()
    return lin


@torch.no_grad()
def shape_probe(model, dcfg, train_limit: int = 2000) -> dict:
    """{'probe_shape_kind': linear probe on the bag of codes, 'probe_shape_kind_majority': per-code majority vote
    over the bag, 'probe_shape_kind_centre_code': the majority kind of the centre patch's code alone, and the object
    counts} on the val split's shapes objects (empty when the raw dir has no shapes scenes)."""
    raw = Path(dcfg.raw_dir)
    xt, ct, yt = object_bags(model, dcfg, raw / "train", train_limit)
    xv, cv, yv = object_bags(model, dcfg, raw / "val")
    if not len(yt) or not len(yv):
        return {}
    classes = len(shapes.KINDS)
    lin = fit_linear_probe(xt, yt, classes)
    linear = (lin(xv / xv.sum(1, keepdim=True).clamp(min=1)).argmax(1) == yv).float().mean()
    # each code votes for the kind it most often belongs to on train (codes never seen on train abstain)
    per_code = torch.stack([xt[yt == c].sum(0) for c in range(classes)], 1)  # [codebook, classes]
    votes = xv @ (F.one_hot(per_code.argmax(1), classes).float() * (per_code.sum(1, keepdim=True) > 0))
    majority = (votes.argmax(1) == yv).float().mean()
    # the centre patch alone is flat colour at 8-pixel patches: only context the ViT mixed in can tell the kind
    centre_votes = torch.zeros(xt.shape[1], classes).index_put_((ct, yt), torch.ones(len(yt)), accumulate=True)
    centre = (centre_votes[cv].argmax(1) == yv).float().mean()
    return {"probe_shape_kind": round(float(linear), 4), "probe_shape_kind_majority": round(float(majority), 4),
            "probe_shape_kind_centre_code": round(float(centre), 4),
            "probe_objects": int(len(yv)), "probe_train_objects": int(len(yt))}
