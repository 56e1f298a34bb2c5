"""One raw shard -> one token shard, in two halves around the image tokenizer's forward (pretokenize.py runs them).

`prepare` (a CPU worker): read the shard, validate and decode every image once, resize it for each use (the
understanding resize for prompts, the generation crop for t2i targets and decoder pairs), and hand the tokenizer
its exact input: normalised float32 batches of one size, cut as `ImageTokenizer.encode_images` cuts them (groups
by size in order, `batch_size` per forward), sent as soon as each is full. `finish_steps` (the same worker, once the
ids are back): the official layout, the token shard tar and its index, as a generator that yields after each raw
sample, so the worker can run it in the gaps while it waits for the forward on its next shard. The forward itself is
the only thing the tokenizer's process does, so its device (or core) never waits for decoding.

Decoder pairs (`data.decoder_pairs`): every image's generation-crop VQ ids are stored on the first token sample of
its raw sample (member `gen.npy`, int32, the grids concatenated) with a pointer in its json (`gen`: raw member
name, grid, sha1 of the raw member's bytes). The pixels stay in the raw shard (`index.json` names it): a 512x512
crop is 786 KB of pixels against 1 KB of ids, so a copy would multiply the token dir's size; the decoder decodes
and crops the raw image again (cheap next to its training step; no tokenizer forward) and the sha1 tells it when
the raw shard changed since pretokenize.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator

import numpy as np

from data_pipeline import layout
from data_pipeline.formats import ImageLimits, Quarantine, RawSample, parse_sample
from data_pipeline.image_tokenizer.prepare import resize
from data_pipeline.manifest import index_path, write_json_atomic
from data_pipeline.sources import RawShard, ShardReader
from data_pipeline.tar_writer import npy_bytes, write_tar
from data_pipeline.text_tokenizer import load_text_tokenizer, text_tokenizer_path, vocab_layout

LAYOUT_VERSION = "llada2-uni-v1"
SHARD_FORMAT = 3  # bump when the token shard or index format changes: finished shards are then redone (3: gen.npy)
CAPTION_PROMPT = "describe this image."
INDEX_COLUMNS = ["key", "len", "task", "n_image_tokens", "ids_off", "ids_size", "mask_off", "mask_size", "mod_off",
                 "mod_size", "json_off", "json_size"]


@dataclass(frozen=True)
class ImageTokenizerInfo:
    """What the workers need of the image tokenizer without its weights (the forward runs elsewhere)."""

    codebook_size: int
    mean: tuple
    std: tuple
    patch_size: int
    fingerprint: str

    @classmethod
    def of(cls, tok) -> "ImageTokenizerInfo":
        return cls(tok.codebook_size, tuple(tok.mean), tuple(tok.std), tok.patch_size, tok.fingerprint)


def _unit_hash(s: str) -> float:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little") / 2 ** 64


class Batcher:
    """Pixel arrays of one shard -> the tokenizer's batches: by size in order of first appearance, `batch_size`
    each (the cut of `encode_images`, so ids do not depend on who runs the forward). `submit(uint8 [B, H, W, 3])`
    takes a full batch away (normalising it where the forward will read it) and returns its number."""

    def __init__(self, batch_size: int, submit: Callable[[np.ndarray], int]):
        self.bs, self.submit = batch_size, submit
        self.pending: dict[tuple, list[np.ndarray]] = {}
        self.batches: dict[tuple, list[int]] = {}  # size -> numbers of its submitted batches, in order
        self.count: dict[tuple, int] = {}

    def add(self, rgb: np.ndarray) -> tuple[tuple, int]:
        """An RGB uint8 [H, W, 3] image -> its handle (size, position within the size)."""
        size = rgb.shape
        k = self.count.get(size, 0)
        self.count[size] = k + 1
        group = self.pending.setdefault(size, [])
        group.append(rgb)
        if len(group) == self.bs:
            self._submit(size)
        return size, k

    def _submit(self, size: tuple) -> None:
        self.batches.setdefault(size, []).append(self.submit(np.stack(self.pending.pop(size))))

    def flush(self) -> None:
        for size in list(self.pending):
            self._submit(size)

    def locate(self, handle: tuple[tuple, int]) -> tuple[int, int]:
        size, k = handle
        return self.batches[size][k // self.bs], k % self.bs

    def number(self, handle: tuple[tuple, int]) -> int | None:
        """The batch number of a handle's image; None while its batch is still filling."""
        size, k = handle
        ns = self.batches.get(size, ())
        return ns[k // self.bs] if k // self.bs < len(ns) else None

    def numbers(self) -> list[int]:
        return sorted(n for ns in self.batches.values() for n in ns)


@dataclass
class Prepared:
    """A shard between the halves: counts, quarantine, and per sample its text fields with image handles."""

    shard: RawShard
    n_inputs: int = 0
    quarantine: list = field(default_factory=list)
    truncated: str = ""
    failed: str = ""
    nbytes: int = 0
    plan: list = field(default_factory=list)  # (RawSample without pixels, und handles, t2i handle, pairs)
    batcher: Batcher | None = None
    read: bool = False  # the whole shard has been read (plan, quarantine and counts are final)


class ShardTokenizer:
    """Per-process state: the text tokenizer, the image tokenizer's description, the knobs that shape the output."""

    def __init__(self, dcfg, image: ImageTokenizerInfo):
        self.dcfg, self.icfg, self.image = dcfg, dcfg.image_tokenizer, image
        if self.icfg.resize_factor % image.patch_size:
            raise ValueError(f"data.image_tokenizer.resize_factor={self.icfg.resize_factor} is not a multiple of "
                             f"the image tokenizer's patch_size={image.patch_size}: set it to a multiple (released: "
                             f"2 x patch)")
        self.text = load_text_tokenizer(text_tokenizer_path(dcfg))
        self.specials = layout.SpecialTokens.from_tokenizer(self.text)
        self.offset, self.vocab_size = vocab_layout(self.text, image.codebook_size)
        self.limits = ImageLimits(dcfg.max_input_pixels, dcfg.max_aspect)

    def fingerprint(self) -> dict:
        knobs = {k: getattr(self.dcfg, k) for k in ("caption_tasks", "t2i_uncond_prob", "max_input_pixels",
                                                     "max_aspect", "decoder_pairs")}
        knobs.update({k: getattr(self.icfg, k) for k in ("resize_factor", "min_pixels", "max_pixels",
                                                          "gen_max_patches")})
        h = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:16]
        fp = {"text": self.text.fingerprint, "image": self.image.fingerprint, "layout": LAYOUT_VERSION,
              "format": SHARD_FORMAT, "config": h}
        fp["all"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        return fp

    # ------------------------------------------------------------------------------------------ first half

    def prepare(self, shard: RawShard, submit: Callable[[np.ndarray], int]) -> Prepared:
        p = self.start(shard, submit)
        self.read(p)
        return p

    def start(self, shard: RawShard, submit: Callable[[np.ndarray], int]) -> Prepared:
        """An empty Prepared: `finish_steps` may be started on it before `read` fills it."""
        return Prepared(shard, batcher=Batcher(self.icfg.batch_size, submit))

    def read(self, p: Prepared) -> None:
        shard = p.shard
        reader = ShardReader(shard.url)
        for key, members, err in reader:  # batches leave as they fill: the forward starts on the shard's first
            p.n_inputs += 1
            if err:
                p.truncated = err
                p.quarantine.append({"key": key, "reason": "truncated_tar", "detail": err})
                continue
            try:
                s = parse_sample(key, members, self.limits)
            except Quarantine as q:
                p.quarantine.append({"key": key, "reason": q.reason, "detail": q.detail})
                continue
            p.plan.append(self._resize_and_batch(s, members, p.batcher))
        p.batcher.flush()
        p.nbytes, p.failed = reader.nbytes, reader.failed
        if reader.failed:  # the transport, not the data: nothing of this read is kept, the next run retries
            p.n_inputs, p.plan, p.truncated = 1, [], ""
            p.quarantine = [{"key": "<shard>", "reason": "stream_failed", "detail": f"{shard.url}: {reader.failed}"}]
        p.read = True

    def _resize_and_batch(self, s: RawSample, members: dict, b: Batcher) -> tuple:
        icfg = self.icfg
        und = [b.add(np.asarray(resize(im, icfg, "understand"))) for im in s.images]
        gen_of = (lambda im: b.add(np.asarray(resize(im, icfg, "generate"))))  # noqa: E731
        pairs, gen = [], None
        if self.dcfg.decoder_pairs:
            pairs = [(m, gen_of(im), hashlib.sha1(members[m]).hexdigest()[:16])
                     for m, im in zip(s.image_members, s.images)]
        if s.kind == "caption" and "t2i" in self.dcfg.caption_tasks:
            gen = pairs[0][1] if pairs else gen_of(s.images[0])
        s.images = []  # decoded once, resized, batched: the pixels are no longer needed here
        return s, und, gen, pairs

    # ----------------------------------------------------------------------------------------- second half

    def finish_steps(self, p: Prepared, fetch: Callable[[int], np.ndarray], out_path: Path, t0: float | None = None,
                     ready: Callable[[int], bool] = lambda n: True) -> Generator[bool, None, dict]:
        """`fetch(n)`: the tokenizer's ids [B, gh, gw] for batch number n of those `p.batcher` submitted; `ready(n)`:
        fetch(n) would not block. A generator over `p` while `read` may still be filling it: it lays out each raw sample
        as soon as its ids are back and yields True after each (~0.1-0.5 ms of work here), False when it must wait
        (for ids not `ready`, or for `read` to go on); it returns the shard's stats (`finish` runs it to the end)."""
        t0 = time.time() if t0 is None else t0
        ids: dict[int, np.ndarray] = {}

        def grid(h):
            bi, row = p.batcher.locate(h)
            if bi not in ids:
                ids[bi] = fetch(bi)
            g = ids[bi][row]
            return g, *g.shape

        def waits(sample) -> bool:
            _, und, gen, pairs = sample
            hs = [*und, *([gen] if gen is not None else []), *(h for _, h, _ in pairs)]
            ns = [p.batcher.number(h) for h in hs]
            return any(n is None or (n not in ids and not ready(n)) for n in ns)

        out, tok_text, tok_img, tasks, n_pairs = [], 0, 0, {}, 0
        tk, sp, off = self.text, self.specials, self.offset
        i = 0
        while not p.read or i < len(p.plan):
            if i == len(p.plan) or waits(p.plan[i]):
                yield False
                continue
            s, und, gen, pairs = p.plan[i]
            i += 1
            meta = {"source_key": s.key, **s.meta}
            built = []
            if s.kind == "interleaved":
                segs = [("text", s.texts[i]) if kind == "text" else ("image", *grid(und[i])) for kind, i in s.order]
                built.append(layout.build_interleaved(tk, sp, off, segs, meta))
            elif s.kind == "vqa":
                built.append(layout.build_understanding(tk, sp, off, [grid(und[0])], s.turns[0][0], s.turns[0][1],
                                                        "vqa", meta, extra_turns=s.turns[1:]))
            else:
                if "caption" in self.dcfg.caption_tasks:
                    built.append(layout.build_understanding(tk, sp, off, [grid(und[0])], CAPTION_PROMPT,
                                                            s.texts[0], "caption", meta))
                if gen is not None:
                    uncond = _unit_hash(f"uncond/{s.key}") < self.dcfg.t2i_uncond_prob
                    built.append(layout.build_t2i(tk, sp, off, s.texts[0], *grid(gen), uncondition=uncond,
                                                  meta={**meta, "uncondition": uncond}))
            for j, t in enumerate(built):
                n_img = int(t.modality.sum())
                tok_img += n_img
                tok_text += len(t) - n_img
                tasks[t.task] = tasks.get(t.task, 0) + 1
                info = {"task": t.task, "prompt_len": t.prompt_len, "len": len(t), "meta": t.meta}
                members = {"ids.npy": npy_bytes(t.ids.astype(np.int32)), "maskable.npy": npy_bytes(t.maskable),
                           "modality.npy": npy_bytes(t.modality)}
                if j == 0 and pairs:  # the raw sample's decoder pairs ride on its first token sample
                    grids = [grid(h)[0] for _, h, _ in pairs]
                    info["gen"] = [{"member": m, "grid": list(g.shape), "sha1": sha}
                                   for (m, _, sha), g in zip(pairs, grids)]
                    members["gen.npy"] = npy_bytes(np.concatenate([g.reshape(-1) for g in grids]).astype(np.int32))
                    n_pairs += len(pairs)
                members["json"] = json.dumps(info, sort_keys=True).encode()
                out.append((f"{s.key}-{t.task}", members, t.task, n_img, len(t)))
            yield True
        for n in p.batcher.numbers():  # every batch's ids taken, also those of a failed read's discarded plan
            while n not in ids and not ready(n):
                yield False
            if n not in ids:
                ids[n] = fetch(n)
        if p.failed:  # the read failed after samples were laid out: nothing of it is kept (`read` emptied the plan)
            out, tok_text, tok_img, tasks, n_pairs = [], 0, 0, {}, 0
        offsets = write_tar(out_path, [(k, m) for k, m, *_ in out])
        samples = []
        for key, _, task, n_img, n in out:
            o = offsets[key]
            samples.append([key, n, task, n_img, *o["ids.npy"], *o["maskable.npy"], *o["modality.npy"], *o["json"]])
        stats = {"inputs": p.n_inputs, "ok": len(p.plan), "quarantined": len(p.quarantine),
                 "token_samples": len(out), "text_tokens": tok_text, "image_tokens": tok_img,
                 "images": 0 if p.failed else sum(p.batcher.count.values()), "tasks": tasks,
                 "decoder_pairs": n_pairs}
        # The index does not name the URL: the same bytes give the same token dir over any transport.
        index = {"input": p.shard.name, "input_bytes": p.nbytes, "fingerprint": self.fingerprint(),
                 "stats": stats, "quarantine": p.quarantine, "truncated": p.truncated,
                 **({"failed": p.failed} if p.failed else {}), "columns": INDEX_COLUMNS, "samples": samples}
        write_json_atomic(index_path(out_path), index)  # last: its presence marks the shard finished
        return {**stats, "seconds": time.time() - t0, "shard": p.shard.name, "failed": p.failed}

    def finish(self, p: Prepared, fetch: Callable[[int], np.ndarray], out_path: Path, t0: float | None = None) -> dict:
        """`finish_steps` at once, on a shard `prepare` read to the end."""
        steps = self.finish_steps(p, fetch, out_path, t0)
        while True:
            try:
                next(steps)
            except StopIteration as e:
                return e.value
