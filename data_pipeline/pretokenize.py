"""`unidiff pretokenize`: raw shards -> token shards in the official layout + manifest.json.

One output shard per input shard (`token_dir/<split>/<input name>.tar` + `.index.json`), processed by worker
processes (one per GPU when GPUs exist). A shard counts as finished when its index exists with the current
fingerprint, so a killed run restarted with the same command skips finished shards; outputs are a pure function
of (input, tokenizers, config) and written deterministically, hence byte-identical on rerun.
Bad raw samples are quarantined with a reason and never stop the run; per split, inputs = ok + quarantined.
Raw shards come from `data.raw_dir` or the URL lists `data.train_shards` / `data.val_shards` (sources.py). A shard
whose transport failed counts as one input quarantined as `stream_failed` and stays unfinished: a rerun retries it.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline import layout
from data_pipeline.formats import ImageLimits, Quarantine, parse_sample, write_tar
from data_pipeline.image_tokenizer.load import load_image_tokenizer
from data_pipeline.image_tokenizer.prepare import prepare_pixels
from data_pipeline.manifest import build_manifest, index_path, read_index, tar_offsets, write_json_atomic
from data_pipeline.sources import RawShard, ShardReader, list_raw_shards
from data_pipeline.text_tokenizer import load_text_tokenizer, text_tokenizer_path, vocab_layout
from data_pipeline.token_shards import write_indices

LAYOUT_VERSION = "llada2-uni-v1"
SHARD_FORMAT = 2  # bump when the token shard or index format changes: finished shards are then redone
CAPTION_PROMPT = "describe this image."


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a, allow_pickle=False)
    return b.getvalue()


def _unit_hash(s: str) -> float:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little") / 2 ** 64


class ShardTokenizer:
    """Per-process state: both tokenizers loaded once, the config knobs that shape the output."""

    def __init__(self, dcfg, device: str = "cpu"):
        self.dcfg = dcfg
        self.icfg = dcfg.image_tokenizer
        self.text = load_text_tokenizer(text_tokenizer_path(dcfg))
        self.image = load_image_tokenizer(self.icfg.path, device)
        self.specials = layout.SpecialTokens.from_tokenizer(self.text)
        self.offset, self.vocab_size = vocab_layout(self.text, self.image.codebook_size)
        self.limits = ImageLimits(dcfg.max_input_pixels, dcfg.max_aspect)

    def fingerprint(self) -> dict:
        knobs = {k: getattr(self.dcfg, k) for k in ("caption_tasks", "t2i_uncond_prob", "max_input_pixels",
                                                     "max_aspect")}
        knobs.update({k: getattr(self.icfg, k) for k in ("resize_factor", "min_pixels", "max_pixels",
                                                          "gen_max_patches")})
        h = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:16]
        fp = {"text": self.text.fingerprint, "image": self.image.fingerprint, "layout": LAYOUT_VERSION, "format": SHARD_FORMAT,
              "config": h}
        fp["all"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        return fp

    def tokenize_shard(self, shard: RawShard, out_path: Path) -> dict:
        t0 = time.time()
        quarantine, parsed, truncated = [], [], ""
        n_inputs = 0
        reader = ShardReader(shard.url)
        for key, members, err in reader:
            n_inputs += 1
            if err:
                truncated = err
                quarantine.append({"key": key, "reason": "truncated_tar", "detail": err})
                continue
            try:
                parsed.append(parse_sample(key, members, self.limits))
            except Quarantine as q:
                quarantine.append({"key": key, "reason": q.reason, "detail": q.detail})
        if reader.failed:  # the transport, not the data: nothing of this read is kept, the next run retries
            n_inputs, parsed, truncated = 1, [], ""
            quarantine = [{"key": "<shard>", "reason": "stream_failed", "detail": f"{shard.url}: {reader.failed}"}]
        # Every image this shard needs, then one batched pass per grid size.
        jobs: list[torch.Tensor] = []
        plan = []
        for s in parsed:
            und = [len(jobs) + i for i in range(len(s.images))]
            jobs += [prepare_pixels(im, self.image, self.icfg, "understand") for im in s.images]
            gen = None
            if s.kind == "caption" and "t2i" in self.dcfg.caption_tasks:
                gen = len(jobs)
                jobs.append(prepare_pixels(s.images[0], self.image, self.icfg, "generate"))
            plan.append((s, und, gen))
        ids = self.image.encode_images(jobs, self.icfg.batch_size) if jobs else []
        grid = lambda j: (ids[j].numpy(), *ids[j].shape)  # noqa: E731
        out_samples, tok_text, tok_img, tasks = [], 0, 0, {}
        tk, sp, off = self.text, self.specials, self.offset
        for s, und, gen in plan:
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
            for b in built:
                n_img = int(b.modality.sum())
                tok_img += n_img
                tok_text += len(b) - n_img
                tasks[b.task] = tasks.get(b.task, 0) + 1
                info = {"task": b.task, "prompt_len": b.prompt_len, "len": len(b), "meta": b.meta}
                out_samples.append((f"{s.key}-{b.task}", {
                    "ids.npy": _npy(b.ids.astype(np.int32)), "maskable.npy": _npy(b.maskable),
                    "modality.npy": _npy(b.modality), "json": json.dumps(info, sort_keys=True).encode()}))
        write_tar(out_path, out_samples)
        offsets = tar_offsets(out_path)
        samples = []
        for key, m in out_samples:
            info = json.loads(m["json"])
            o = offsets[key]
            n_img = int(np.load(io.BytesIO(m["modality.npy"])).sum())
            samples.append([key, info["len"], info["task"], n_img, *o["ids.npy"], *o["maskable.npy"], *o["modality.npy"],
                            *o["json"]])
        stats = {"inputs": n_inputs, "ok": len(parsed), "quarantined": len(quarantine),
                 "token_samples": len(out_samples), "text_tokens": tok_text, "image_tokens": tok_img,
                 "images": len(jobs), "tasks": tasks}
        # The index does not name the URL: the same bytes give the same token dir over any transport.
        index = {"input": shard.name, "input_bytes": reader.nbytes, "fingerprint": self.fingerprint(),
                 "stats": stats, "quarantine": quarantine, "truncated": truncated,
                 **({"failed": reader.failed} if reader.failed else {}),
                 "columns": ["key", "len", "task", "n_image_tokens", "ids_off", "ids_size", "mask_off", "mask_size", "mod_off",
                             "mod_size", "json_off", "json_size"], "samples": samples}
        write_json_atomic(index_path(out_path), index)  # last: its presence marks the shard finished
        return {**stats, "seconds": time.time() - t0, "shard": shard.name, "failed": reader.failed}


# ---------------------------------------------------------------------------------------------- orchestration

_WORKER: ShardTokenizer | None = None


def _init_worker(dcfg_dict: dict, threads: int, device_queue) -> None:
    global _WORKER
    from data_pipeline.config import DataConfig, ImageTokenizerConfig, SampleConfig
    d = dict(dcfg_dict)
    d["image_tokenizer"] = ImageTokenizerConfig(**d["image_tokenizer"])
    d["sample"] = SampleConfig(**d["sample"])
    torch.set_num_threads(threads)
    device = device_queue.get() if device_queue is not None else "cpu"
    _WORKER = ShardTokenizer(DataConfig(**d), device)


def _run(job: tuple[RawShard, str]) -> dict:
    return _WORKER.tokenize_shard(job[0], Path(job[1]))


def _status(sh: RawShard, o: Path, fp) -> str:
    """done | failed (transport failed last time: quarantined, retried by the next run) | todo."""
    idx = read_index(o)
    if not (idx and idx["fingerprint"] == fp and o.exists()):
        return "todo"
    if sh.local and not (Path(sh.local).exists() and idx["input_bytes"] == Path(sh.local).stat().st_size):
        return "todo"  # a local input changed size; remote ones are trusted by name (no cheap size probe on pipe:)
    return "failed" if idx.get("failed") else "done"


def _report_failed(failed: list[tuple[str, str]]) -> None:
    if failed:
        print(f"pretokenize: {len(failed)} shards failed to read (quarantined as stream_failed; rerun to retry): "
              + "; ".join(f"{n}: {why}" for n, why in failed[:5]))


def _write_manifest(out: Path, probe: ShardTokenizer, fp: dict) -> dict:
    """manifest.json (vocab layout and special ids included: the loader reads them, not the tokenizer), then the
    loader's memory-mapped index columns keyed by it (token_shards.py)."""
    vocab = {"image_token_offset": probe.offset, "vocab_size": probe.vocab_size,
             "codebook_size": probe.image.codebook_size, "text_vocab_size": probe.text.vocab_size}
    manifest = build_manifest(out, fp, vocab, probe.specials.to_dict())
    write_indices(out, manifest)
    return manifest


def merge_manifest(dcfg) -> dict:
    out = Path(dcfg.token_dir)
    probe = ShardTokenizer(dcfg)
    fp = probe.fingerprint()
    status = {sh: _status(sh, out / sh.split / sh.name, fp) for sh in list_raw_shards(dcfg)}
    missing = [sh.url for sh, s in status.items() if s == "todo"]
    if missing:
        raise RuntimeError(f"{len(missing)} raw shards have no finished token shard: {missing[:5]}")
    _report_failed([(sh.name, read_index(out / sh.split / sh.name)["failed"]) for sh, s in status.items()
                    if s == "failed"])
    return _write_manifest(out, probe, fp)


def pretokenize(dcfg, workers: int | None = None, progress: bool = True, shards=None) -> dict:
    out = Path(dcfg.token_dir)
    ins = list_raw_shards(dcfg)  # a bad URL list fails before the tokenizers load
    probe = ShardTokenizer(dcfg)  # fails fast on missing tokenizers, before any worker starts
    fp = probe.fingerprint()
    jobs, skipped = [], 0
    if shards is not None:
        ins = ins[shards[0]:shards[1]]
    for sh in ins:
        o = out / sh.split / sh.name
        o.parent.mkdir(parents=True, exist_ok=True)
        if _status(sh, o, fp) == "done":
            skipped += 1
            continue
        jobs.append((sh, str(o)))
    if not jobs and not skipped:
        where = ("data.train_shards / data.val_shards expand to no URL" if dcfg.train_shards or dcfg.val_shards
                 else f"no raw shards under {dcfg.raw_dir}/train or {dcfg.raw_dir}/val")
        raise FileNotFoundError(f"{where}: run `unidiff data make-sample`, set data.raw_dir or list shard URLs")
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if workers is None:
        workers = dcfg.pretokenize_workers or (n_gpu or min(os.cpu_count() or 1, max(len(jobs), 1)))
    workers = max(1, min(workers, max(len(jobs), 1)))
    threads = max(1, (os.cpu_count() or 1) // workers) if "OMP_NUM_THREADS" not in os.environ else \
        int(os.environ["OMP_NUM_THREADS"])
    t0, imgs, toks, failed = time.time(), 0, 0, []
    bar = tqdm(total=len(jobs), desc="pretokenize", unit="shard", disable=not progress)
    if workers == 1 and not n_gpu:
        torch.set_num_threads(threads)
        results = (probe.tokenize_shard(sh, Path(o)) for sh, o in jobs)
        pool = None
    else:
        ctx = mp.get_context("spawn" if n_gpu else "fork")
        dq = None
        if n_gpu:
            dq = ctx.Manager().Queue()
            for i in range(workers):
                dq.put(f"cuda:{i % n_gpu}")
        pool = ctx.Pool(workers, _init_worker, (asdict(dcfg), threads, dq))
        results = pool.imap_unordered(_run, jobs)
    try:
        for r in results:
            imgs += r["images"]
            toks += r["text_tokens"] + r["image_tokens"]
            if r["failed"]:
                failed.append((r["shard"], r["failed"]))
            dt = max(time.time() - t0, 1e-9)
            bar.set_postfix(img_s=f"{imgs / dt:.0f}", tok_s=f"{toks / dt:.0f}")
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    _report_failed(sorted(failed))
    if shards is not None:
        print(f"pretokenize: shards {shards[0]}:{shards[1]}: {len(jobs)} done, {skipped} skipped")
        return {"shards_done": len(jobs), "shards_skipped": skipped}
    manifest = _write_manifest(out, probe, fp)
    dt = time.time() - t0
    sp = manifest["splits"]
    summary = ", ".join(f"{s}: {v['inputs']} in = {v['ok']} ok + {v['quarantined']} quarantined -> "
                        f"{v['token_samples']} samples" for s, v in sp.items())
    print(f"pretokenize: {len(jobs)} shards done, {skipped} skipped (finished); {summary}; {imgs / max(dt, 1e-9):.0f} "
          f"images/s, {toks / max(dt, 1e-9):.0f} tokens/s over {dt:.1f}s -> {out}/manifest.json")
    return {"manifest": manifest, "shards_done": len(jobs), "shards_skipped": skipped, "images": imgs,
            "tokens": toks, "seconds": dt}

