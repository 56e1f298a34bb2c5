"""Raw shard sources: which WebDataset tars pretokenize reads, and reading one as (key, members, error) samples.

`data.train_shards` / `data.val_shards` list URLs or brace patterns, opened by webdataset's gopen: local paths,
`file:`, `pipe:CMD` (a shell command's stdout, e.g. `pipe:aws s3 cp s3://bucket/train-000000.tar -`) and
`http(s)://` (gopen runs curl). With both lists empty, `data.raw_dir/{train,val}/*.tar` is read. A shard's token
shard is named after the URL's file name, so the same bytes give the same token shards whatever the transport.

Two kinds of failure are kept apart, because only one of them goes away on a retry:
- the bytes are bad (a truncated or corrupt tar): the samples before the damage are used and the damaged one is
  quarantined as `truncated_tar`; reading again gives the same, so the shard is finished.
- the transport failed (a pipe command exited nonzero, curl lost the connection, the source could not be
  opened): pretokenize quarantines the whole shard as `stream_failed` and leaves it unfinished for the next run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand

from training.config_errors import ConfigError

UNKNOWN_KEY = "<unknown>"  # a sample blamed for damage before any member was read
_TAR_SUFFIX = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$")
_DRAIN_CHUNK = 1 << 20


def webdataset():
    """webdataset on first use: it imports torch (~2 s), which make-sample and the other readers of formats.py
    do not need."""
    import webdataset as wds

    return wds


@dataclass(frozen=True)
class RawShard:
    """One work unit of pretokenize: a raw shard and where its token shard goes (token_dir/<split>/<name>)."""

    split: str  # train | val
    url: str  # what gopen opens
    name: str  # token shard file name, `<stem>.tar`
    local: str = ""  # the file, when the URL is a local one: its size marks a changed input on resume


def _local_path(url: str) -> str:
    pr = urlparse(url)
    if pr.scheme == "":
        return url
    return url2pathname(pr.path) if pr.scheme == "file" else ""


def shard_name(url: str) -> str:
    """The token shard name for a raw shard URL: its file name with the tar suffix made `.tar`. For `pipe:` it is
    the last word of the command that ends like a tar (`pipe:aws s3 cp s3://b/train-000001.tar -` -> train-000001)."""
    if url.startswith("pipe:"):
        words = [w for w in re.split(r"[\s;|&<>()'\"]+", url[5:]) if _TAR_SUFFIX.search(w.split("?", 1)[0])]
        base = words[-1].split("?", 1)[0].rsplit("/", 1)[-1] if words else ""
    else:
        local = _local_path(url)
        base = Path(local).name if local else urlparse(url).path.rsplit("/", 1)[-1]
    stem = _TAR_SUFFIX.sub("", base) if _TAR_SUFFIX.search(base) else ""
    return f"{stem}.tar" if stem else ""


def _raw_shard(split: str, url: str) -> RawShard:
    key = f"data.{split}_shards"
    scheme = urlparse(url).scheme
    if scheme and scheme != "file" and scheme not in webdataset().gopen_schemes:
        hint = " (for S3 use pipe:aws s3 cp s3://bucket/key.tar -)" if scheme in ("s3", "s3a") else ""
        raise ConfigError(f"{key} contains {url!r}: scheme {scheme!r} is not allowed; use a local path, file:, "
                          f"pipe:CMD or http(s)://{hint}")
    name = shard_name(url)
    if not name:
        raise ConfigError(f"{key} contains {url!r}: the token shard is named after the URL's file name, which must "
                          f"end in .tar (.tar.gz, .tgz, ...); for pipe: one word of the command must, e.g. "
                          f"pipe:aws s3 cp s3://bucket/train-000000.tar -")
    return RawShard(split, url, name, _local_path(url))


def list_raw_shards(dcfg) -> list[RawShard]:
    """Every raw shard in a fixed order (train then val; URL lists as expanded, raw_dir folders sorted), which
    `unidiff pretokenize --shards A:B` and SLURM array tasks index into."""
    if not (dcfg.train_shards or dcfg.val_shards):
        raw = Path(dcfg.raw_dir)
        return [RawShard(split, str(p), p.name, str(p)) for split in ("train", "val")
                for p in sorted((raw / split).glob("*.tar"))]
    out = []
    for split, patterns in (("train", dcfg.train_shards), ("val", dcfg.val_shards)):
        seen: dict[str, str] = {}
        for url in (u for p in patterns for u in braceexpand.braceexpand(p)):
            sh = _raw_shard(split, url)
            if sh.name in seen:
                raise ConfigError(f"data.{split}_shards: {seen[sh.name]!r} and {url!r} both give the token shard "
                                  f"{split}/{sh.name}; shard file names must be unique within a split")
            seen[sh.name] = url
            out.append(sh)
    return out


# ------------------------------------------------------------------------------------------------ reading

class _Source:
    """The opened URL: counts bytes and keeps the first error the transport itself raised (not tar parsing)."""

    def __init__(self, url: str):
        self.url, self.nbytes, self.error = url, 0, None
        self.raw = webdataset().gopen(url, "rb")

    def read(self, n: int = -1) -> bytes:
        try:
            b = self.raw.read(n)
        except Exception as e:  # a gopen Pipe raises here once its command exited nonzero
            self.error = self.error or e
            raise
        self.nbytes += len(b)
        return b

    def finish(self, drain: bool) -> None:
        """Read to the end (a pipe's exit status and curl's short transfer only show at EOF; the byte count is the
        whole input) and close, which waits for a pipe's command and raises on a nonzero exit."""
        try:
            while drain and self.read(_DRAIN_CHUNK):
                pass
        except Exception:
            pass  # kept in self.error
        try:
            self.raw.close()
        except Exception as e:
            if drain:  # closing a pipe early (consumer stopped) is not a failure of the source
                self.error = self.error or e

    def __str__(self) -> str:  # webdataset appends str(stream) to error messages; keep them reproducible
        return self.url


def _describe(e: BaseException, src: _Source | None = None) -> str:
    tag = f" @ {src}" if src is not None else ""
    if tag and e.args and isinstance(e.args[0], str) and e.args[0].endswith(tag):
        e.args = (e.args[0][:-len(tag)],) + e.args[1:]  # undo webdataset's " @ <stream>" suffix
    return f"{type(e).__name__}: {e}"


def _split_name(fname: str) -> tuple[str, str]:
    k, _, ext = fname.rsplit("/", 1)[-1].partition(".")
    return k, ext


class ShardReader:
    """Iterate one raw shard as (key, {ext: bytes}, error); consecutive members sharing a key are a sample.
    Damage ends the stream with one item whose error names it (its members are those read before the damage).
    After a full pass, `nbytes` is the input size and `failed` describes a transport failure ("" if none)."""

    def __init__(self, url: str):
        self.url, self.nbytes, self.failed = url, 0, ""

    def __iter__(self):
        try:
            src = _Source(self.url)
        except Exception as e:
            self.failed = _describe(e)
            yield UNKNOWN_KEY, {}, f"truncated_tar: {self.failed}"
            return
        completed = False
        try:
            yield from self._samples(src)
            completed = True
        finally:
            src.finish(drain=completed)
            self.nbytes = src.nbytes
            if src.error is not None:
                self.failed = _describe(src.error, src)

    @staticmethod
    def _samples(src: _Source):
        state = {"reading": None, "error": None}

        def select(fname: str) -> bool:  # called just before a member's data is read
            state["reading"] = fname
            return True

        def handler(exn: Exception) -> bool:
            state["error"] = exn
            return False  # a tar stream cannot resynchronise after damage: stop this shard

        key, members = None, {}
        try:
            # skip_meta=None: keep `__*__/...` members (counted in their sample); webdataset still drops bare
            # `__name__` members (no extension, so no sample member) before any hook sees them
            members_of = webdataset().tariterators.tar_file_iterator
            for f in members_of(src, skip_meta=None, handler=handler, select_files=select):
                state["reading"] = None
                k, ext = _split_name(f["fname"])
                if k != key:
                    if key is not None:
                        yield key, members, None
                    key, members = k, {}
                members[ext] = f["data"]
        except Exception as e:  # header damage is raised past webdataset's handler
            state["error"] = e
        err = state["error"]
        if err is None:
            if key is not None:
                yield key, members, None
            return
        if state["reading"] is not None:  # damage inside a member's data: blame that member's sample
            k, _ = _split_name(state["reading"])
            if k != key:
                if key is not None:
                    yield key, members, None
                key, members = k, {}
        yield (key or UNKNOWN_KEY), members, f"truncated_tar: {_describe(err, src)}"
