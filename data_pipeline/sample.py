"""`unidiff data make-sample OUT`: the bundled raw data every command can run on.

(a) real photographs shipped inside installed wheels (scikit-image, scikit-learn, matplotlib), read from their
install paths (never copied into the repo), resized down, with captions written here; (b) the procedural shapes
world (`data_pipeline.shapes`): caption pairs, VQA samples and multi-image interleaved documents.
Also builds the small text tokenizer from all sample text (`OUT/tokenizer.json`).
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from data_pipeline import layout, shapes
from data_pipeline.formats import write_tar
from data_pipeline.text_tokenizer import build_sample_tokenizer

# (package, path inside the package, caption). Captions written for this project from the packages' docstrings.
PHOTOS = [
    ("skimage", "data/astronaut.png", "a portrait of an astronaut in a white spacesuit in front of a flag."),
    ("skimage", "data/chelsea.png", "a tabby cat looking to the side."),
    ("skimage", "data/coffee.png", "a cup of coffee on a saucer with a spoon."),
    ("skimage", "data/rocket.jpg", "a rocket lifting off from a launch pad."),
    ("skimage", "data/motorcycle_left.png", "a red motorcycle parked in a garage."),
    ("skimage", "data/hubble_deep_field.jpg", "a deep field of distant galaxies in space."),
    ("skimage", "data/ihc.png", "a microscope image of stained tissue."),
    ("skimage", "data/retina.jpg", "a photograph of the retina of a human eye."),
    ("skimage", "data/camera.png", "a black and white photo of a man with a camera on a tripod."),
    ("skimage", "data/coins.png", "a black and white photo of old greek coins."),
    ("skimage", "data/moon.png", "a black and white photo of the surface of the moon."),
    ("skimage", "data/page.png", "a scanned page of printed text."),
    ("skimage", "data/color.png", "a colour wheel with many hues."),
    ("skimage", "data/grass.png", "a close up of green grass."),
    ("skimage", "data/brick.png", "a brick wall."),
    ("sklearn", "datasets/images/china.jpg", "a chinese temple with a tree in front."),
    ("sklearn", "datasets/images/flower.jpg", "a close up of a pink flower."),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "a portrait of a woman in a navy uniform."),
]


def photo_path(package: str, rel: str) -> Path:
    mod = __import__(package)
    return Path(mod.__file__).parent / rel


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG", optimize=False)
    return b.getvalue()


def _jpg(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.convert("RGB").save(b, format="JPEG", quality=90)
    return b.getvalue()


def load_photos(max_side: int) -> list[tuple[str, Image.Image, str]]:
    out = []
    for pkg, rel, cap in PHOTOS:
        p = photo_path(pkg, rel)
        if not p.exists():
            continue  # a newer wheel may drop a file; the sample just has one photo fewer
        img = Image.open(p)
        img = img.convert("RGB") if img.mode not in ("RGB", "L") else img
        s = max_side / max(img.size)
        if s < 1:
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
        out.append((Path(rel).stem.replace("_", "-"), img, cap))
    return out


def make_split(split: str, scfg, photos) -> tuple[list, list[str]]:
    """Samples [(key, members)] and every text (for the tokenizer) of one split."""
    n_scenes = scfg.train_scenes if split == "train" else scfg.val_scenes
    n_docs = scfg.train_docs if split == "train" else scfg.val_docs
    samples, texts = [], []
    for i in range(n_scenes):
        scene = shapes.scene_for(scfg.seed, split, i, scfg.image_size)
        rng = random.Random(f"{scfg.seed}/{split}/{i}/text")
        png = _png(shapes.render(scene))
        cap = shapes.caption(scene, rng)
        meta = {"source": "shapes", "answer_key_id": scene.scene_id, "scene": scene.to_json()}
        samples.append((f"shapes-cap-{split}-{i:06d}", {"png": png, "txt": cap.encode(),
                                                         "json": json.dumps({"meta": meta}).encode()}))
        qas = shapes.pick_questions(scene, rng, scfg.vqa_turns if split == "train" else 1)
        conv = [turn for k, qa in enumerate(qas) for turn in (
            {"from": "human", "value": ("" if k else "<image>\n") + qa.question}, {"from": "gpt", "value": qa.answer})]
        samples.append((f"shapes-vqa-{split}-{i:06d}", {"png": png, "json": json.dumps(
            {"conversations": conv, "meta": {**meta, "qtype": qas[0].qtype}}).encode()}))
        texts += [cap] + [t for qa in qas for t in (qa.question, qa.answer)]
    for j in range(n_docs):
        rng = random.Random(f"{scfg.seed}/{split}/doc{j}")
        members, dtexts, dimages = {}, [], []
        kinds = []
        for k in range(rng.randint(2, 3)):
            scene = shapes.scene_for(scfg.seed, f"{split}-doc{j}", k, scfg.image_size)
            members[f"{k}.png"] = _png(shapes.render(scene))
            dtexts += [f"picture {k + 1}:", None, f"it shows {shapes.caption(scene, rng)}"]
            dimages += [None, f"{k}.png", None]
            kinds += [s.kind for s in scene.shapes]
        dtexts.append(f"in total there are {shapes.NUMBER_WORDS[min(len(kinds), 4)] if len(kinds) <= 4 else len(kinds)}"
                      f" shapes.")
        dimages.append(None)
        members["json"] = json.dumps({"texts": dtexts, "images": dimages,
                                      "meta": {"source": "shapes-doc"}}).encode()
        samples.append((f"shapes-doc-{split}-{j:06d}", members))
        texts += [t for t in dtexts if t]
    # Real photos: all as caption pairs in train, every third in val; one interleaved photo doc per split.
    chosen = photos if split == "train" else photos[::3]
    for name, img, cap in chosen:
        data = _jpg(img) if img.mode == "RGB" else _png(img)
        ext = "jpg" if img.mode == "RGB" else "png"
        samples.append((f"photo-{split}-{name}", {ext: data, "txt": cap.encode(),
                                                  "json": json.dumps({"meta": {"source": "photo"}}).encode()}))
        texts.append(cap)
    if len(chosen) >= 2:
        (n1, i1, c1), (n2, i2, c2) = chosen[0], chosen[1]
        doc = {"texts": ["here are two photos.", None, f"the first shows {c1}", None, f"the second shows {c2}"],
               "images": [None, "0.png", None, "1.png", None], "meta": {"source": "photo-doc"}}
        samples.append((f"photo-doc-{split}", {"0.png": _png(i1), "1.png": _png(i2),
                                               "json": json.dumps(doc).encode()}))
        texts += [t for t in doc["texts"] if t]
    # Deterministic shuffle so every shard mixes kinds.
    samples.sort(key=lambda s: hashlib.sha256(f"{scfg.seed}/{s[0]}".encode()).hexdigest())
    return samples, texts


def make_sample(out: str | Path, scfg, progress: bool = True) -> dict:
    out = Path(out)
    t0 = time.time()
    photos = load_photos(scfg.photo_max_side)
    all_texts = [layout.SYSTEM_UNDERSTAND, layout.SYSTEM_T2I, " ".join([layout.ROLE_SYSTEM, layout.ROLE_HUMAN,
                                                                           layout.ROLE_ASSISTANT])]
    counts = {}
    for split in ("train", "val"):
        samples, texts = make_split(split, scfg, photos)
        all_texts += texts
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        n = scfg.shards_per_split
        for s in tqdm(range(n), desc=f"make-sample {split}", disable=not progress):
            write_tar(d / f"{split}-{s:06d}.tar", samples[s::n], sort_members=False)
        counts[split] = len(samples)
    tok = build_sample_tokenizer(all_texts, out / "tokenizer.json", vocab_size=scfg.text_vocab_size)
    info = {"samples": counts, "photos": len(photos), "text_vocab_size": tok.vocab_size,
            "seconds": round(time.time() - t0, 2)}
    print(f"make-sample: {counts['train']} train + {counts['val']} val raw samples in {scfg.shards_per_split} shards"
          f"/split ({len(photos)} real photos), tokenizer {tok.vocab_size} ids -> {out} in {info['seconds']}s")
    return info

