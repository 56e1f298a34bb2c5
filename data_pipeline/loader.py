"""Deterministic, resumable, data-parallel-rank-aware loader over token shards.

Each epoch has a plan that depends only on (seed, epoch, sources, seq_len, block_size): a per-epoch document
order (weighted mixing of sources), packed into rows from lengths alone (`packing.plan_rows`). Global batch k is
rows [k*B*D, (k+1)*B*D); data-parallel rank r takes its B rows from it. Every rank computes the same plan, so ranks
are disjoint and together cover every packed row of each full global batch (the last partial global batch of an
epoch is dropped and counted). The split is by the DATA-parallel rank you pass — tensor/expert-parallel peers of
one replica pass the same dp_rank and get identical batches (webdataset's split_by_node would use the global rank).

Samples come from `token_shards.TokenShards` (memory-mapped index columns, reads by pread); the pad id from the
special ids pretokenize records in manifest.json, so the loader does not load the text tokenizer.
state_dict() = (epoch, next batch); load_state_dict() resumes exactly mid-epoch without reading skipped data.
Batch schema: input_ids, doc_ids (0.. per row, padding -1), maskable, is_image, position_ids (restart at 0 per
document, 0 on padding), all [B, L]; plus sample_ids [B, L] (global sample id, -1 on padding) for tracing, and on
a trajectory token dir reveal [B, L] (packing.materialise_row).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_pipeline.layout import SpecialTokens
from data_pipeline.packing import PAD_DOC, materialise_row, plan_rows
from data_pipeline.token_shards import TASKS, TokenShards
from training.config_errors import ConfigError

TokenSource = TokenShards  # the earlier name


def manifest_specials(source: TokenShards, dcfg) -> SpecialTokens:
    """The special ids (pad = EOS) recorded by pretokenize in manifest.json. A token dir written before they were
    recorded falls back to the configured tokenizer, once, with a warning, and only if it is the tokenizer that
    made the shards (same fingerprint): such a dir may have lost its raw shards, which a rerun would need."""
    if "specials" in source.manifest:
        return SpecialTokens.from_dict(source.manifest["specials"])
    from data_pipeline.text_tokenizer import load_text_tokenizer, text_tokenizer_path
    path = text_tokenizer_path(dcfg)
    tok = load_text_tokenizer(path)
    made_by = source.manifest.get("fingerprint", {}).get("text")
    if tok.fingerprint != made_by:
        raise ValueError(f"{source.token_dir}/manifest.json records no special token ids and the tokenizer {path} "
                         f"(fingerprint {tok.fingerprint}) is not the one that wrote the shards ({made_by}): rerun "
                         f"`unidiff pretokenize CONFIG` (finished shards are skipped) to record them")
    print(f"loader: {source.token_dir}/manifest.json has no special token ids (older pretokenize); read them from "
          f"{path}; rerun `unidiff pretokenize CONFIG` (finished shards are skipped) to record them")
    return SpecialTokens.from_tokenizer(tok)


def resolve_sources(dcfg) -> list[tuple[TokenShards, float]]:
    """data.datasets: {name: weight}; a name is a task of data.token_dir (caption|vqa|t2i|interleaved) or the path
    of another token dir. Empty: the whole data.token_dir, one source."""
    if not dcfg.datasets:
        return [(TokenShards(dcfg.token_dir, dcfg.split), 1.0)]
    out = []
    for name, w in dcfg.datasets.items():
        src = TokenShards(dcfg.token_dir, dcfg.split, (name,)) if name in TASKS else TokenShards(name, dcfg.split)
        out.append((src, float(w)))
    return out


def epoch_order(sizes: list[int], weights: list[float], seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, index) for every draw of an epoch (sum(sizes) draws). One source: a permutation. Several: each
    draw picks a source by weight; a source walks its own permutation, reshuffled on each wrap."""
    total = int(sum(sizes))
    if len(sizes) == 1:
        return np.zeros(total, dtype=np.int64), np.random.default_rng([seed, epoch, 0]).permutation(total)
    p = np.asarray(weights, dtype=np.float64)
    choice = np.random.default_rng([seed, epoch, 1 << 20]).choice(len(sizes), size=total, p=p / p.sum())
    index = np.zeros(total, dtype=np.int64)
    for s, n in enumerate(sizes):
        where = np.nonzero(choice == s)[0]
        k = np.arange(len(where))
        cycles = int(k[-1] // n) + 1 if len(k) else 0
        perms = np.concatenate([np.random.default_rng([seed, epoch, s, c]).permutation(n) for c in range(cycles)]) \
            if cycles else np.zeros(0, dtype=np.int64)
        index[where] = perms[k]
    return choice, index


class _EpochBatches(Dataset):
    """Map-style view of one epoch for one rank: item k = this rank's k-th micro batch (built in a worker)."""

    def __init__(self, sources, src, idx, rows, B, dp_rank, dp_size, seq_len, block_size, pad_id, offset, G):
        self.sources, self.src, self.idx, self.rows = sources, src, idx, rows
        self.B, self.dp_rank, self.dp_size, self.G = B, dp_rank, dp_size, G
        self.seq_len, self.block_size, self.pad_id, self.offset = seq_len, block_size, pad_id, offset
        # a trajectory token dir (training/backbone_distill) carries the sampler's reveal order in its mask column
        self.reveal = any(s.manifest.get("trajectories") for s in sources)

    def __len__(self) -> int:
        # whole global batches only: the epoch ends at the same row for every (dp size, micro batch) of one
        # global batch size, so an elastic resume keeps the global order
        return len(self.rows) // self.G * (self.G // (self.B * self.dp_size))

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        first = (k * self.dp_size + self.dp_rank) * self.B
        out: dict[str, list] = {}
        for row in self.rows[first:first + self.B]:
            pieces, sids = [], []
            for d, s, e in row:
                sid, i = int(self.src[d]), int(self.idx[d])
                ids, msk, mod = self.sources[sid].read(i)
                pieces.append((ids[s:e], msk[s:e], mod[s:e]))
                sids.append((sid << 40) | i)
            r = materialise_row(pieces, self.seq_len, self.pad_id, self.block_size, reveal=self.reveal)
            r["sample_ids"] = np.where(r["doc_ids"] == PAD_DOC, -1,
                                       np.asarray(sids + [-1], dtype=np.int64)[r["doc_ids"]])
            for key, v in r.items():
                out.setdefault(key, []).append(v)
        return {k: torch.from_numpy(np.stack(v)) for k, v in out.items()}


class _Cursor:
    """Where a loader is: (epoch, micro batches this rank has yielded in it). Saved with the count of *global* rows
    consumed, so a resume with another data-parallel size or micro batch (same global batch) continues the same
    global sample order: row j of an epoch is micro batch j // (B * dp) of rank (j // B) % dp on any layout."""

    def _cursor_init(self, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, seq_len: int,
                     global_batch_size: int | None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.seq_len, self.B, self.dp_rank, self.dp_size, self.seed = seq_len, micro_batch_size, dp_rank, dp_size, seed
        self.G = global_batch_size or micro_batch_size * dp_size
        if self.G % (self.B * dp_size):
            raise ValueError(f"global batch {self.G} is not a multiple of micro_batch_size x dp_size = "
                             f"{self.B} x {dp_size}")
        self.epoch, self.batch = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "rows": self.batch * self.B * self.dp_size,
                "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size, "seq_len": self.seq_len,
                "micro_batch_size": self.B, "global_batch_size": self.G}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("seed", "seq_len", "global_batch_size"):
            mine = getattr(self, {"global_batch_size": "G"}.get(k, k))
            if k in sd and sd[k] != mine:
                raise ValueError(f"loader state has {k}={sd[k]} but this loader has {mine}; a resume needs the same "
                                 f"seed, seq_len and global batch size (the data-parallel size may change)")
        rows = int(sd.get("rows", int(sd["batch"]) * sd.get("micro_batch_size", self.B) * sd.get("dp_size", 1)))
        if rows % (self.B * self.dp_size):
            raise ValueError(f"loader state is {rows} rows into epoch {sd['epoch']}, not a whole number of "
                             f"micro_batch_size x dp_size = {self.B} x {self.dp_size} micro batches")
        self.epoch, self.batch = int(sd["epoch"]), rows // (self.B * self.dp_size)


class TokenLoader(_Cursor):
    def __init__(self, dcfg, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 block_size: int | None = None, global_batch_size: int | None = None):
        self._cursor_init(micro_batch_size, dp_rank, dp_size, seed, seq_len, global_batch_size)
        self.sources_w = resolve_sources(dcfg)
        self.sources = [s for s, _ in self.sources_w]
        vocabs = {tuple(sorted(s.vocab.items())) for s in self.sources}
        if len(vocabs) > 1:
            raise ValueError(f"data.datasets mixes token dirs with different vocab layouts: {vocabs}")
        self.vocab = self.sources[0].vocab
        self.specials = manifest_specials(self.sources[0], dcfg)  # (pad, mask, ...) from manifest.json
        self.pad_id = self.specials.pad
        self.block_size = block_size if (block_size and dcfg.pad_to_block) else None
        self.drop_too_long = dcfg.drop_too_long
        self.num_workers = dcfg.num_workers
        self.stats: dict = {}
        self._plan_cache: tuple | None = None

    def specials_for(self, mcfg) -> SpecialTokens:
        """The shards' special ids, once the model's vocab layout is checked against the one they were written
        with (image id = VQ id + image_token_offset)."""
        v = self.vocab
        if mcfg.image_token_offset != v["image_token_offset"] or mcfg.vocab_size < v["vocab_size"]:
            raise ConfigError(f"model.image_token_offset={mcfg.image_token_offset} / model.vocab_size="
                              f"{mcfg.vocab_size} do not match the token shards' layout (manifest.json: "
                              f"image_token_offset={v['image_token_offset']}, vocab_size={v['vocab_size']}): use "
                              f"model.image_token_offset={v['image_token_offset']} model.vocab_size={v['vocab_size']}")
        return self.specials

    def plan(self, epoch: int):
        if self._plan_cache and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        src, idx = epoch_order([len(s) for s in self.sources], [w for _, w in self.sources_w], self.seed, epoch)
        if len(self.sources) == 1:
            lens, split = self.sources[0].lengths[idx], self.sources[0].splittable[idx]
        else:
            lens, split = np.zeros(len(src), dtype=np.int64), np.zeros(len(src), dtype=bool)
            for s, source in enumerate(self.sources):
                m = src == s
                lens[m], split[m] = source.lengths[idx[m]], source.splittable[idx[m]]
        plan = plan_rows(lens, split, self.seq_len, self.block_size)
        if len(plan.dropped) and not self.drop_too_long:
            raise ValueError(f"{len(plan.dropped)} documents are longer than seq_len={self.seq_len} and cannot be "
                             f"cut (they hold an image or a prompt/answer pair): raise train.seq_len or set "
                             f"data.drop_too_long=true")
        ds = _EpochBatches(self.sources, src, idx, plan.rows, self.B, self.dp_rank, self.dp_size, self.seq_len,
                           self.block_size, self.pad_id, self.vocab["image_token_offset"], self.G)
        self.stats = {"epoch": epoch, "documents": len(src), "rows": len(plan.rows), "batches": len(ds),
                      "dropped_too_long": len(plan.dropped), "padding_fraction":
                      plan.padding / max(len(plan.rows) * self.seq_len, 1),
                      "rows_dropped_tail": len(plan.rows) - len(ds) * self.B * self.dp_size}
        self._plan_cache = (epoch, ds)
        return ds

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def __iter__(self):
        while True:
            ds = self.plan(self.epoch)
            if len(ds) == 0:
                raise ValueError(f"epoch {self.epoch} has no full global batch: {self.stats['rows']} rows < "
                                 f"micro_batch_size x dp_size = {self.B * self.dp_size}")
            start = self.batch
            # Its own generator: creating a DataLoader iterator draws a base seed, which must not come from the
            # global RNG the trainer restores on resume (the first mask after a resume would be one draw off).
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            dl = DataLoader(ds, batch_size=None, sampler=range(start, len(ds)), num_workers=self.num_workers,
                            generator=gen)
            for k, b in enumerate(dl, start):
                self.batch = k + 1  # count yielded batches, not prefetched ones
                yield b
            self.epoch, self.batch = self.epoch + 1, 0


class SyntheticLoader(_Cursor):
    """Seeded random-but-learnable token data with the loader's batch schema (no shards needed).

    Documents: text "copy" tasks (prompt of random text ids, answer = the prompt reversed + EOS) and "image" tasks
    (prompt = one class id, answer = that class's fixed 16-token image pattern); answers are maskable. Global row j
    of an epoch is a pure function of (seed, epoch, j) and is laid out over ranks like the token loader's rows, so it
    resumes (elastically too) exactly like the token loader.
    """

    rows_per_epoch = 1 << 16

    def __init__(self, seq_len, micro_batch_size, dp_rank, dp_size, seed, vocab_size, image_token_offset,
                 block_size=None, global_batch_size=None):
        self._cursor_init(micro_batch_size, dp_rank, dp_size, seed, seq_len, global_batch_size)
        self.V, self.offset, self.block_size = vocab_size, image_token_offset, block_size
        self.eos = 0

    def _doc(self, rng: np.random.Generator):
        text_hi = max(self.offset - 2, 8)  # offset-1 / offset-2 are synthetic mask / <uncondition> (specials_for)
        if self.offset < self.V and rng.random() < 0.3:
            c = int(rng.integers(1, min(16, text_hi)))
            pat = self.offset + (np.arange(16) * 7 + c * 31) % (self.V - self.offset)
            ids = np.concatenate([[c], pat, [self.eos]])
            return ids, np.arange(len(ids)) >= 1, ids >= self.offset
        n = int(rng.integers(3, 12))
        p = rng.integers(1, text_hi, size=n)
        ids = np.concatenate([p, p[::-1], [self.eos]])
        return ids, np.arange(len(ids)) >= n, np.zeros(len(ids), dtype=bool)

    def make_batch(self, epoch: int, k: int) -> dict[str, torch.Tensor]:
        rows = {}
        for b in range(self.B):
            rng = np.random.default_rng([self.seed, epoch, (k * self.dp_size + self.dp_rank) * self.B + b])
            pieces, fill = [], 0
            while True:
                ids, m, img = self._doc(rng)
                span = len(ids) if not self.block_size else -(-len(ids) // self.block_size) * self.block_size
                if fill + span > self.seq_len:
                    break
                pieces.append((ids, m, img.astype(np.uint8)))
                fill += span
            r = materialise_row(pieces, self.seq_len, self.eos, self.block_size)
            r["sample_ids"] = np.where(r["doc_ids"] < 0, -1, r["doc_ids"])
            for key, v in r.items():
                rows.setdefault(key, []).append(v)
        return {k2: torch.from_numpy(np.stack(v)) for k2, v in rows.items()}

    def __len__(self):
        return self.rows_per_epoch // self.G * (self.G // (self.B * self.dp_size))

    def __iter__(self):
        while True:
            while self.batch < len(self):
                k = self.batch
                self.batch += 1
                yield self.make_batch(self.epoch, k)
            self.epoch, self.batch = self.epoch + 1, 0


def build_loader(cfg_data, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 block_size: int | None = None, global_batch_size: int | None = None):
    """cfg_data: the `data` section (or the root Config: then synthetic mode takes the vocab from `model`)."""
    root = cfg_data if hasattr(cfg_data, "data") else None
    dcfg = root.data if root is not None else cfg_data
    block_size = block_size if dcfg.pad_to_block else None
    if dcfg.synthetic:
        if root is not None:
            V, off = root.model.vocab_size, root.model.image_token_offset
        else:
            V = dcfg.synthetic_vocab_size
            off = min(2048, V)
        return SyntheticLoader(seq_len, micro_batch_size, dp_rank, dp_size, seed, V, off, block_size,
                               global_batch_size)
    return TokenLoader(dcfg, seq_len, micro_batch_size, dp_rank, dp_size, seed, block_size, global_batch_size)
