"""`unidiff pretokenize`: raw shards -> token shards in the official layout + manifest.json.

One output shard per input shard (`token_dir/<split>/<input name>.tar` + `.index.json`). Processes: one image
tokenizer process per GPU (on a CPU-only machine, this process), each with `data.pretokenize_workers` CPU worker
processes beside it that read, decode, resize and write whole shards (shard_tokenizer.py); the tokenizer process
only runs forwards on the batches the workers send (shared memory) and sends the ids back, so it never waits on
decoding. A shard counts as finished when its index exists with the current fingerprint, so a killed run restarted
with the same command skips finished shards; outputs are a pure function of (input, tokenizers, config) and written
deterministically (batches are cut per shard), hence byte-identical on rerun whatever the number of processes.
Bad raw samples are quarantined with a reason and never stop the run; per split, inputs = ok + quarantined.
Raw shards come from `data.raw_dir` or the URL lists `data.train_shards` / `data.val_shards` (sources.py). A shard
whose transport failed counts as one input quarantined as `stream_failed` and stays unfinished: a rerun retries it.
"""
from __future__ import annotations

import collections
import ctypes
import math
import os
import queue
import signal
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as tmp
from PIL import Image
from tqdm import tqdm

from data_pipeline.image_tokenizer.load import load_image_tokenizer
from data_pipeline.image_tokenizer.preprocess import normalise
from data_pipeline.manifest import build_manifest, read_index
from data_pipeline.shard_tokenizer import ImageTokenizerInfo, ShardTokenizer
from data_pipeline import sources
from data_pipeline.sources import RawShard, list_raw_shards
from data_pipeline.token_shards import write_indices

WATCH_S = 5.0  # how often the tokenizer process checks that its workers are alive while it waits
DEFERRED_SHARDS = 4  # prepared shards a worker may hold unwritten (a small shard after a large one gives too few waits)


def _data_config(d: dict):
    from data_pipeline.config import DataConfig, ImageTokenizerConfig, SampleConfig
    d = dict(d)
    d["image_tokenizer"] = ImageTokenizerConfig(**d["image_tokenizer"])
    d["sample"] = SampleConfig(**d["sample"])
    return DataConfig(**d)


def _die_with_parent() -> None:
    """A worker must not outlive its tokenizer process (SIGKILL, OOM): it would wait on its queues forever."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the parent's normal exit still ends the workers (daemon processes)


class _Channel:
    """A worker's link to its tokenizer process. Batches are normalised straight into one of SLOTS shared-memory
    slots (a slot's tensor crosses the queue once, when it is made or outgrown; afterwards a message is a slot
    number and a shape: measured, a fresh shared tensor per batch cost the tokenizer process ~1 ms of CPU, 5% of
    a 64-image forward here). A slot is reused once its batch's ids came back (they come back in order).

    Shards being read or waiting to be written sit in `later`; they are laid out and written a raw sample at a time
    (ShardTokenizer.finish_steps) whenever the worker would otherwise block on the forward (its ids not back yet):
    measured, writing a 1,150-image shard in one go between shards (~0.3 s) left the forward idle once its SLOTS
    batches were done, 1 s of a 5 s run; and a shard's own samples are laid out while it is still being read, so
    the last shard leaves little to write once the forward is done."""

    SLOTS = 3

    def __init__(self, wid: int, requests, responses, mean, std):
        self.wid, self.requests, self.responses, self.mean, self.std = wid, requests, responses, mean, std
        self.slots: list[torch.Tensor | None] = [None] * self.SLOTS
        self.sent, self.received, self.ids = 0, 0, {}
        self.later: collections.deque = collections.deque()  # finish_steps generators, oldest shard first

    def _receive(self) -> None:
        while self.later and self.responses.empty() and self._step():
            pass  # the forward is busy: spend the wait writing a shard
        self.ids[self.received] = self.responses.get()
        self.received += 1

    def _step(self) -> bool:
        """One raw sample of the oldest shard in `later`; False: it waits on ids (or on its read) instead."""
        try:
            return next(self.later[0])
        except StopIteration as e:
            self.later.popleft()
            self.requests.put(("done", self.wid, e.value))
            return True

    def ready(self, n: int) -> bool:
        return n < self.received

    def drain(self, keep: int) -> None:
        """Write shards until `keep` remain in `later` (bounds the ids and plans held); all of them must be read."""
        while len(self.later) > keep:
            if not self._step():
                self._receive()

    def submit(self, u8: np.ndarray) -> int:
        n, i = self.sent, self.sent % self.SLOTS
        while self.received < n - self.SLOTS + 1:  # the slot's previous batch is still being read
            self._receive()
        new = None
        if self.slots[i] is None or self.slots[i].numel() < u8.size:
            self.slots[i] = new = torch.empty(u8.size).share_memory_()
        b, h, w, c = u8.shape
        normalise(u8, self.mean, self.std, out=self.slots[i][:u8.size].view(b, c, h, w))
        self.requests.put(("batch", self.wid, (i, (b, c, h, w), new)))
        self.sent += 1
        return n

    def result(self, n: int) -> np.ndarray:
        while self.received <= n:
            self._receive()
        return self.ids.pop(n)


def _worker(st: ShardTokenizer, jobs, requests, responses, wid: int) -> None:
    """One CPU worker (forked: `st`, the tokenizer process's own, comes with the fork) over whole shards: prepare
    shard k+1 (its batches go out as they fill) while writing shards <= k+1 in the waits, so the forward has work."""
    _die_with_parent()
    torch.set_num_threads(1)
    try:
        ch = _Channel(wid, requests, responses, st.image.mean, st.image.std)
        while (job := jobs.get()) is not None:
            p = st.start(job[0], ch.submit)
            ch.later.append(st.finish_steps(p, ch.result, Path(job[1]), time.time(), ch.ready))
            st.read(p)
            ch.drain(DEFERRED_SHARDS)
        ch.drain(0)
    except BaseException:
        requests.put(("error", wid, traceback.format_exc()))
        raise


def _run_device(dcfg, device: str, jobs: list, workers: int, threads: int, on_done, probe=None) -> None:
    """One image tokenizer process: start the workers (forked before the model touches a device, with everything
    they need already loaded and imported), then serve forwards until every job reported done. probe:
    `probe_tokenizers(dcfg)`, if already loaded here."""
    ctx = tmp.get_context("fork")
    job_q, requests = ctx.Queue(), ctx.Queue(maxsize=2 * workers)  # bounded: the workers wait, memory does not grow
    responses = [ctx.Queue() for _ in range(workers)]
    for j in jobs:
        job_q.put(j)
    for _ in range(workers):
        job_q.put(None)
    st, image = probe if probe is not None else probe_tokenizers(dcfg)
    sources.webdataset()  # imported once here, not by every forked worker (~0.3 s each)
    Image.preinit()  # PIL's common decoders, likewise
    procs = [ctx.Process(target=_worker, args=(st, job_q, requests, responses[w], w), daemon=True)
             for w in range(workers)]
    for p in procs:
        p.start()
    try:
        torch.set_num_threads(threads)
        tok = image.to(device)
        done, slots = 0, {}
        while done < len(jobs):
            try:
                kind, wid, x = requests.get(timeout=WATCH_S)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"pretokenize: worker pid {dead[0].pid} died (exit code {dead[0].exitcode}, "
                                       f"e.g. out of memory); finished shards are kept, rerun to continue") from None
                continue
            if kind == "batch":
                i, shape, new = x
                if new is not None:
                    slots[wid, i] = new
                px = slots[wid, i][:math.prod(shape)].view(shape)
                responses[wid].put(tok.encode(px.to(device)).cpu().numpy())
            elif kind == "done":
                done += 1
                on_done(x)
            else:
                raise RuntimeError(f"pretokenize: a worker failed:\n{x}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


def _device_process(dcfg_dict, device, jobs, workers, threads, results) -> None:
    try:
        _run_device(_data_config(dcfg_dict), device, jobs, workers, threads, results.put)
    except BaseException:
        results.put({"error": traceback.format_exc()})
        raise


def _devices() -> list[str]:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def run_jobs(dcfg, jobs: list[tuple[RawShard, str]], workers: int | None = None, on_done=lambda r: None,
             devices: list[str] | None = None, probe=None) -> None:
    """Tokenize `jobs` [(raw shard, token shard path)] with one tokenizer process per device and `workers` CPU
    workers beside each (None: data.pretokenize_workers, 0 there: the cores left)."""
    devices = devices or _devices()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # SLURM's share
    per_dev = max(1, cpus // len(devices))
    workers = workers or dcfg.pretokenize_workers or max(1, per_dev - 1)
    workers = max(1, min(workers, -(-len(jobs) // len(devices))))
    # The forward's threads: the cores its workers leave (measured: 2 intra-op threads on 2 shared cores run the
    # tiny ViT far slower than 1, fit_codebook.single_thread_unless_set); OMP_NUM_THREADS wins.
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, per_dev - workers))
    if len(devices) == 1:
        return _run_device(dcfg, devices[0], jobs, workers, threads, on_done, probe)
    ctx = tmp.get_context("spawn")  # CUDA: a fresh interpreter per device
    results = ctx.Queue()
    procs = [ctx.Process(target=_device_process, args=(asdict(dcfg), d, jobs[i::len(devices)], workers, threads,
                                                       results)) for i, d in enumerate(devices)]
    for p in procs:
        p.start()
    try:
        for _ in range(len(jobs)):
            r = results.get()
            if "error" in r:
                raise RuntimeError(f"pretokenize: a tokenizer process failed:\n{r['error']}")
            on_done(r)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


# ---------------------------------------------------------------------------------------------- orchestration

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


def probe_tokenizers(dcfg):
    """Both tokenizers loaded here first: a missing one fails before any worker starts."""
    image = load_image_tokenizer(dcfg.image_tokenizer.path)
    return ShardTokenizer(dcfg, ImageTokenizerInfo.of(image)), image


def merge_manifest(dcfg) -> dict:
    out = Path(dcfg.token_dir)
    probe, _ = probe_tokenizers(dcfg)
    fp = probe.fingerprint()
    status = {sh: _status(sh, out / sh.split / sh.name, fp) for sh in list_raw_shards(dcfg)}
    missing = [sh.url for sh, s in status.items() if s == "todo"]
    if missing:
        raise RuntimeError(f"{len(missing)} raw shards have no finished token shard: {missing[:5]}")
    _report_failed([(sh.name, read_index(out / sh.split / sh.name)["failed"]) for sh, s in status.items()
                    if s == "failed"])
    return _write_manifest(out, probe, fp)


def pretokenize(dcfg, workers: int | None = None, progress: bool = True, shards=None,
                devices: list[str] | None = None) -> dict:
    """workers: CPU workers per tokenizer process (None: data.pretokenize_workers); shards (a, b): only those of
    `list_raw_shards` (an array task; `merge_manifest` then writes the manifest); devices: default one per GPU."""
    out = Path(dcfg.token_dir)
    ins = list_raw_shards(dcfg)  # a bad URL list fails before the tokenizers load
    probe, image = probe_tokenizers(dcfg)
    sources.webdataset()  # start-up like the tokenizers' load (~0.12 s here): before the clock, not in images/s
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
    t0, totals, failed = time.time(), {"images": 0, "tokens": 0}, []
    bar = tqdm(total=len(jobs), desc="pretokenize", unit="shard", disable=not progress)

    def on_done(r: dict) -> None:
        totals["images"] += r["images"]
        totals["tokens"] += r["text_tokens"] + r["image_tokens"]
        if r["failed"]:
            failed.append((r["shard"], r["failed"]))
        dt = max(time.time() - t0, 1e-9)
        bar.set_postfix(img_s=f"{totals['images'] / dt:.0f}", tok_s=f"{totals['tokens'] / dt:.0f}")
        bar.update(1)

    try:
        if jobs:
            run_jobs(dcfg, jobs, workers, on_done, devices, (probe, image))
    finally:
        bar.close()
    _report_failed(sorted(failed))
    if shards is not None:
        print(f"pretokenize: shards {shards[0]}:{shards[1]}: {len(jobs)} done, {skipped} skipped")
        return {"shards_done": len(jobs), "shards_skipped": skipped}
    manifest = _write_manifest(out, probe, fp)
    dt = time.time() - t0
    imgs, toks = totals["images"], totals["tokens"]
    sp = manifest["splits"]
    summary = ", ".join(f"{s}: {v['inputs']} in = {v['ok']} ok + {v['quarantined']} quarantined -> "
                        f"{v['token_samples']} samples" for s, v in sp.items())
    print(f"pretokenize: {len(jobs)} shards done, {skipped} skipped (finished); {summary}; {imgs / max(dt, 1e-9):.0f} "
          f"images/s, {toks / max(dt, 1e-9):.0f} tokens/s over {dt:.1f}s -> {out}/manifest.json")
    return {"manifest": manifest, "shards_done": len(jobs), "shards_skipped": skipped, "images": imgs,
            "tokens": toks, "seconds": dt}
