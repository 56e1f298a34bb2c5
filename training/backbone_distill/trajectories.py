"""Path distillation's data: the model's own sampler trajectories on the training prompts, verified, as token shards.

For every single-turn prompt of the chosen tasks, `generate_text` (the sampler evals and `generate` use, at the
run's diffusion.sample_* settings) decodes an answer; one whose answer passes the verifier is kept as a token
sample: ids = prompt + the decoded blocks up to the end of the block holding its EOS, and the mask column holds
its trajectory: 0 on the prompt, k + 1 where the sampler accepted the token at the k-th step of its block. The
loader passes that column as `reveal` (data_pipeline/packing.py) and the objective masks each block at a cut of it
(training/diffusion/noise.trajectory_mask). Prompts of one length are decoded together, without left padding, so
the sampler's blocks start at the same positions as the training blocks (packing starts a document on a block).
Rejected ones are quarantined with their reason, so inputs = ok + quarantined in the manifest, like pretokenize's.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from data_pipeline.manifest import build_manifest, index_path, write_json_atomic
from data_pipeline.shard_tokenizer import INDEX_COLUMNS
from data_pipeline.tar_writer import npy_bytes, write_tar
from data_pipeline.token_shards import write_indices
from training.config_errors import ConfigError

SHARD = "shard-000000.tar"


def exact(prompt: list[int], answer: list[int], reference: list[int]) -> bool:
    """The shapes world's verifier: the answer is the reference, token for token (both without their EOS)."""
    return answer == reference


def load_verifier(spec: str):
    if spec == "exact":
        return exact
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"distill_backbone.verifier={spec} cannot be loaded ({e}): give exact or module:function "
                          f"with f(prompt_ids, answer_ids, reference_ids) -> bool") from None
    return fn


def _prompts(source, eos: int, max_prompts: int):
    """(key, prompt ids, prompt modality, reference ids without EOS) of single-turn samples; and the rest, skipped
    with a reason."""
    keep, skipped = [], []
    for i in range(len(source)):
        ids, msk, mod = source.read(i)
        where = np.flatnonzero(msk)
        key = f"sample-{i:07d}"
        if not len(where) or not msk[where[0]:].all():
            skipped.append({"key": key, "reason": "not_single_turn"})
            continue
        p = int(where[0])
        ref = ids[p:].tolist()
        keep.append((key, ids[:p].tolist(), mod[:p], ref[:ref.index(eos)] if eos in ref else ref))
        if max_prompts and len(keep) >= max_prompts:
            break
    return keep, skipped


def sample_trajectories(model, items, settings, specials, verifier, batch_size: int, device=None):
    """-> (kept: [(key, ids, reveal column, modality)], quarantined: [{key, reason}], sampler forwards)."""
    from training.diffusion.samplers import generate_text

    by_len = defaultdict(list)
    for it in items:
        by_len[len(it[1])].append(it)
    kept, rejected, forwards, B = [], [], 0, settings.block_length
    for plen, group in sorted(by_len.items()):
        for s in range(0, len(group), batch_size):
            chunk = group[s:s + batch_size]
            res = generate_text(model, [p for _, p, _, _ in chunk], settings, mask_id=specials.mask,
                                eos_id=specials.eos, device=device)
            forwards += res.nfe
            for (key, prompt, mod, ref), row, n, rev in zip(chunk, res.tokens.cpu(), res.lengths.cpu(),
                                                              res.reveal.cpu()):
                answer = row[:int(n)].tolist()
                if not verifier(prompt, answer, ref):
                    rejected.append({"key": key, "reason": "unverified"})
                    continue
                # up to the end of the block holding its EOS (all of gen_length without one)
                end = min(-(-(plen + int(n) + 1) // B) * B, plen + settings.gen_length) - plen
                ids = np.asarray(prompt + row[:end].tolist(), dtype=np.int32)
                if (rev[:end] < 0).any() or int(rev.max()) > 253:
                    raise ValueError(f"{key}: the trajectory has positions never accepted or steps > 254")
                order = np.concatenate([np.zeros(plen, np.uint8), (rev[:end].numpy() + 1).astype(np.uint8)])
                kept.append((key, ids, order, np.concatenate([mod, np.zeros(end, np.uint8)]).astype(np.uint8)))
    return kept, rejected, forwards


def write_token_dir(out: Path, samples, quarantined: list, inputs: int, like: dict, extra: dict | None = None) -> dict:
    """One token shard (tar + index) of `samples` [(key, ids int32, mask column, modality uint8)] in out/train and
    its manifest.json (vocab, specials and fingerprint of the manifest `like`, plus `extra`), then the loader's
    index columns. Every sample is task `vqa` (a prompt / answer pair, which packing never cuts)."""
    split = out / "train"
    split.mkdir(parents=True, exist_ok=True)
    tar = split / SHARD
    members = [(key, {"ids.npy": npy_bytes(ids), "maskable.npy": npy_bytes(order), "modality.npy": npy_bytes(mod),
                      "json": json.dumps({"task": "vqa", "len": len(ids)}).encode()})
               for key, ids, order, mod in samples]
    offsets = write_tar(tar, members)
    rows = [[key, len(ids), "vqa", int(mod.sum()), *offsets[key]["ids.npy"], *offsets[key]["maskable.npy"],
             *offsets[key]["modality.npy"], *offsets[key]["json"]] for key, ids, _, mod in samples]
    n_img = sum(int(m.sum()) for *_, m in samples)
    stats = {"inputs": inputs, "ok": len(samples), "quarantined": len(quarantined), "token_samples": len(samples),
             "text_tokens": sum(len(i) for _, i, _, _ in samples) - n_img, "image_tokens": n_img, "images": 0,
             "tasks": {"vqa": len(samples)}}
    write_json_atomic(index_path(tar), {"input": out.name, "fingerprint": like.get("fingerprint", {}),
                                        "stats": stats, "quarantine": quarantined, "columns": INDEX_COLUMNS,
                                        "samples": rows})
    manifest = build_manifest(out, like.get("fingerprint", {}), like["vocab"], like.get("specials"))
    if extra:
        manifest.update(extra)
        write_json_atomic(out / "manifest.json", manifest)
    write_indices(out, manifest)
    return manifest


def make_trajectories(cfg, out: Path, source_dir: str) -> dict:
    """Sample, verify and write the trajectory dir `out` from the backbone at `source_dir`; returns its manifest."""
    from data_pipeline.loader import manifest_specials
    from data_pipeline.token_shards import TokenShards
    from training.diffusion.samplers import SamplerSettings
    from training.inference.backbone import load_backbone

    db = cfg.distill_backbone
    t0 = time.perf_counter()
    source = TokenShards(cfg.data.token_dir, db.split, tuple(db.tasks))
    specials = manifest_specials(source, cfg.data)
    items, skipped = _prompts(source, specials.eos, db.max_prompts)
    model, loaded = load_backbone(cfg, source_dir)
    settings = SamplerSettings.from_config(cfg.diffusion)
    device = next(model.parameters()).device
    kept, rejected, forwards = sample_trajectories(model, items, settings, specials, load_verifier(db.verifier),
                                                   db.batch_size, device)
    meta = {"checkpoint": loaded, "token_dir": str(cfg.data.token_dir), "split": db.split, "tasks": list(db.tasks),
            "verifier": db.verifier, "settings": dataclasses.asdict(settings), "sampler_forwards": forwards}
    # the mask column holds the trajectory: `trajectories` in the manifest tells the loader to pass it as `reveal`
    manifest = write_token_dir(out, kept, skipped + rejected, len(items) + len(skipped), source.manifest,
                               {"trajectories": meta})
    gen = sum(int((o > 0).sum()) for _, _, o, _ in kept)
    print(f"distill-backbone: {len(kept)}/{len(items)} trajectories verified ({len(skipped)} prompts skipped), "
          f"{gen} generated tokens kept, {forwards} sampler forwards, {time.perf_counter() - t0:.1f} s -> {out}",
          flush=True)
    return manifest
