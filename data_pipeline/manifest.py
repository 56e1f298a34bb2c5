"""Token-shard index files and the dataset manifest.

Per token shard `<name>.tar` there is `<name>.index.json` (written last, atomically: its presence with the current
fingerprint is what marks the shard finished). It lists every sample with its length and the byte offsets of its
members inside the tar, so the loader plans packing from lengths alone and reads samples by seek.
`manifest.json` aggregates the indices: inputs, ok, quarantined (with reasons), token counts per modality,
tokenizer fingerprint, the vocab layout and the special token ids (`specials`, so the loader never loads the text
tokenizer), and per shard the sha256 of its index (`index_sha`): any changed shard changes the manifest, which keys
the loader's memory-mapped index (token_shards.py). A shard whose transport failed (index key `failed`) is one input,
quarantined as `stream_failed`; its row says `failed` until a rerun reads it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_VERSION = 2  # 2: + specials, + per-shard index_sha
MEMBERS = ("ids.npy", "maskable.npy", "modality.npy", "json")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def index_path(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name[:-len(".tar")] + ".index.json")


def read_index(tar_path: Path) -> dict | None:
    p = index_path(tar_path)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None  # a torn write cannot happen (atomic rename), but a hand-edited file can


def build_manifest(token_dir: Path, fingerprint: dict, vocab: dict, specials: dict | None = None) -> dict:
    splits = {}
    for split_dir in sorted(p for p in token_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        shards, quarantine, reasons = [], [], {}
        tot = {"inputs": 0, "ok": 0, "quarantined": 0, "token_samples": 0, "text_tokens": 0, "image_tokens": 0,
               "images": 0}
        tasks: dict[str, int] = {}
        for tar in sorted(split_dir.glob("*.tar")):
            idx = read_index(tar)
            if idx is None:
                continue
            index_sha = hashlib.sha256(index_path(tar).read_bytes()).hexdigest()[:16]
            st = idx["stats"]
            for k in tot:
                tot[k] += st[k]
            for t, n in st["tasks"].items():
                tasks[t] = tasks.get(t, 0) + n
            for q in idx["quarantine"]:
                quarantine.append({"shard": idx["input"], **q})
                reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
            shards.append({"output": tar.name, "input": idx["input"], **{k: st[k] for k in
                                                                          ("inputs", "ok", "quarantined",
                                                                           "token_samples")},
                           "truncated": idx.get("truncated", ""), "index_sha": index_sha,
                           **({"failed": idx["failed"]} if idx.get("failed") else {})})  # transport: retried
        if not shards:
            continue
        if tot["inputs"] != tot["ok"] + tot["quarantined"]:
            raise AssertionError(f"{split_dir.name}: inputs {tot['inputs']} != ok {tot['ok']} + quarantined "
                                 f"{tot['quarantined']}")
        splits[split_dir.name] = {**tot, "tasks": dict(sorted(tasks.items())), "shards": shards,
                                  "quarantine_reasons": dict(sorted(reasons.items())), "quarantine": quarantine}
    manifest = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "vocab": vocab, "splits": splits,
                **({"specials": specials} if specials is not None else {})}
    write_json_atomic(token_dir / "manifest.json", manifest)
    return manifest


def load_manifest(token_dir: str | Path) -> dict:
    p = Path(token_dir) / "manifest.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: run `unidiff pretokenize` (or set data.token_dir, or "
                                f"data.synthetic=true to train on synthetic tokens)")
    return json.loads(p.read_text())
