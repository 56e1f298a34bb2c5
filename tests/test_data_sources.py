"""Raw shards as webdataset URLs (`data.train_shards` / `data.val_shards`): HTTP from a real server on 127.0.0.1,
`pipe:` commands and local paths give the raw_dir run's token dir byte for byte; a transport failure is quarantined
at shard level and retried by the next run; webdataset and wids read the token shards back."""
from __future__ import annotations

import dataclasses
import io
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_pipeline.formats import iter_tar_samples, write_tar
from data_pipeline.image_tokenizer.fit_codebook import fit_codebook
from data_pipeline.manifest import read_index
from data_pipeline.pretokenize import merge_manifest, pretokenize
from data_pipeline.sample import make_sample
from data_pipeline.sources import ShardReader, list_raw_shards, shard_name
from launch.commands import cmd_pretokenize
from tests.test_data_pipeline import small_cfg
from training.config import load_config
from training.config_errors import ConfigError


class _Handler(BaseHTTPRequestHandler):
    """GET <root>/<path>; `server.cut[path] = n` announces the full Content-Length, sends n bytes and hangs up,
    as a server dying mid-transfer does."""

    def do_GET(self):
        p = self.server.root / self.path.lstrip("/")
        if not p.is_file():
            self.send_error(404)
            return
        data = p.read_bytes()
        n = self.server.cut.get(self.path, len(data))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:n])
        self.close_connection = n < len(data)

    def log_message(self, *args):
        pass


@contextmanager
def serve(root: Path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root, httpd.cut = Path(root), {}
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join()


def tree(d) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw_env(tmp_path_factory):
    """4 + 4 small raw shards, tokenizers, and the reference token dir from data.raw_dir."""
    d = small_cfg(tmp_path_factory.mktemp("sources"))
    d.sample.train_scenes, d.sample.val_scenes, d.sample.train_docs, d.sample.val_docs = 120, 24, 12, 4
    d.sample.shards_per_split = 4
    make_sample(d.raw_dir, d.sample, progress=False)
    fit_codebook(d, progress=False)
    d.text_tokenizer = str(Path(d.raw_dir) / "tokenizer.json")
    pretokenize(d, progress=False)
    return d


@pytest.fixture(scope="module")
def http(raw_env):
    with serve(Path(raw_env.raw_dir)) as httpd:
        yield httpd


# ------------------------------------------------------------------------------------------------ unit

@pytest.mark.unit
def test_shard_names_and_url_errors(tmp_path):
    assert shard_name("pipe:aws s3 cp s3://bucket/laion/train-000001.tar -") == "train-000001.tar"
    assert shard_name("https://host/a/b-7.tar.gz?X-Amz-Signature=1") == "b-7.tar"
    assert shard_name("file:///data/v-2.tgz") == "v-2.tar"
    assert shard_name("/data/raw/train/x-1.tar") == "x-1.tar"
    assert shard_name("pipe:curl -s https://h/x.zip") == ""
    d = dataclasses.replace(small_cfg(tmp_path), train_shards=["http://h/t-{000000..000002}.tar"],
                            val_shards=["pipe:cat /v/v-000000.tar"])
    got = [(s.split, s.name, s.local) for s in list_raw_shards(d)]
    assert got == [("train", "t-000000.tar", ""), ("train", "t-000001.tar", ""), ("train", "t-000002.tar", ""),
                   ("val", "v-000000.tar", "")]
    for shards, words in ((["s3://bucket/t-0.tar"], "pipe:aws s3 cp"), (["http://h/t.zip"], "end in .tar"),
                          (["http://a/t-0.tar", "pipe:cat /b/t-0.tar"], "unique")):
        with pytest.raises(ConfigError, match=words):
            list_raw_shards(dataclasses.replace(d, train_shards=shards))
    with pytest.raises(ConfigError, match="data.val_shards"):
        load_config(None, ['data.val_shards=[""]'])


@pytest.mark.unit
def test_reader_tells_transport_failures_from_damaged_tars(tmp_path):
    write_tar(tmp_path / "ok.tar", [(f"k{i}", {"txt": b"x" * (300 * i + 1), "json": b"{}"}) for i in range(20)])
    data = (tmp_path / "ok.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])  # bad bytes: the same on every read
    want, want_cut = list(iter_tar_samples(tmp_path / "ok.tar")), list(iter_tar_samples(tmp_path / "cut.tar"))
    assert len(want) == 20 and want_cut[-1][2].startswith("truncated_tar: ")

    def read(url):
        r = ShardReader(url)
        return list(r), r.failed, r.nbytes

    with serve(tmp_path) as httpd:
        for url in (str(tmp_path / "ok.tar"), f"file://{tmp_path}/ok.tar", f"{httpd.url}/ok.tar",
                    f"pipe:cat {tmp_path}/ok.tar"):
            assert read(url) == (want, "", len(data)), url
        for url in (str(tmp_path / "cut.tar"), f"{httpd.url}/cut.tar", f"pipe:cat {tmp_path}/cut.tar"):
            assert read(url)[:2] == (want_cut, ""), url  # damaged data, not transport: not retried
        httpd.cut["/ok.tar"] = len(data) // 3
        assert "exit 18" in read(f"{httpd.url}/ok.tar")[1]  # curl: transfer closed with bytes remaining
        assert "exit 22" in read(f"{httpd.url}/missing.tar")[1]  # curl -f: HTTP 404
    assert "exit 3" in read(f"pipe:cat {tmp_path}/ok.tar && exit 3")[1]  # whole tar read, then the command failed
    assert "exit 1" in read(f"pipe:head -c 5000 {tmp_path}/ok.tar && false")[1]
    items, failed, _ = read(str(tmp_path / "missing.tar"))
    assert failed.startswith("FileNotFoundError") and items[0][2].startswith("truncated_tar: FileNotFoundError")


# ------------------------------------------------------------------------------------------------ e2e

@pytest.mark.e2e
def test_http_and_pipe_urls_give_the_raw_dir_token_shards(raw_env, http, tmp_path):
    d, raw = raw_env, Path(raw_env.raw_dir)
    ref = tree(d.token_dir)
    assert len([k for k in ref if k.endswith(".tar")]) == 8
    # The CLI's path: dotlist overrides -> config -> cmd_pretokenize, as `unidiff pretokenize CONFIG k=v` runs it.
    words = [f"data.text_tokenizer={d.text_tokenizer}", f"data.image_tokenizer.path={d.image_tokenizer.path}",
             "data.pretokenize_workers=1", f"data.token_dir={tmp_path / 'http'}",
             f'data.train_shards=["{http.url}/train/train-{{000000..000003}}.tar"]',
             f'data.val_shards=["{http.url}/val/val-{{000000..000001}}.tar", "{http.url}/val/val-{{000002..000003}}.tar"]']
    assert cmd_pretokenize(load_config(None, words), None) == 0
    assert tree(tmp_path / "http") == ref
    d_pipe = dataclasses.replace(d, token_dir=str(tmp_path / "pipe"),
                                 train_shards=[f"pipe:cat {raw}/train/train-{{000000..000003}}.tar"],
                                 val_shards=[f"pipe:cat {raw}/val/val-{{000000..000003}}.tar"])
    pretokenize(d_pipe, progress=False, shards=(0, 5))  # as two SLURM array tasks and the merge job run it
    pretokenize(d_pipe, progress=False, shards=(5, 8))
    merge_manifest(d_pipe)
    assert tree(tmp_path / "pipe") == ref


@pytest.mark.e2e
def test_failed_transfer_is_quarantined_per_shard_and_retried(raw_env, http, tmp_path, capsys):
    d, raw = raw_env, Path(raw_env.raw_dir)
    http.cut["/train/train-000001.tar"] = 3000  # the server hangs up 3000 bytes into this shard
    try:
        bad = dataclasses.replace(d, token_dir=str(tmp_path / "tok"),
                                  train_shards=[f"{http.url}/train/train-{{000000..000003}}.tar"],
                                  val_shards=[f"pipe:cat {raw}/val/val-000000.tar && exit 3",
                                              f"{raw}/val/val-{{000001..000003}}.tar"])
        man = pretokenize(bad, progress=False)["manifest"]
    finally:
        http.cut.clear()
    assert "2 shards failed to read" in capsys.readouterr().out
    for split, shard, why in (("train", "train-000001.tar", "exit 18"), ("val", "val-000000.tar", "exit 3")):
        s = man["splits"][split]
        q = [q for q in s["quarantine"] if q["reason"] == "stream_failed"]
        assert len(q) == 1 and q[0]["shard"] == shard and q[0]["key"] == "<shard>" and why in q[0]["detail"], q
        assert s["quarantine_reasons"]["stream_failed"] == 1
        assert s["inputs"] == s["ok"] + s["quarantined"]
        row = next(r for r in s["shards"] if r["input"] == shard)
        assert why in row["failed"] and row["inputs"] == row["quarantined"] == 1 and row["token_samples"] == 0
        assert read_index(tmp_path / "tok" / split / shard)["samples"] == []
    # An array job's merge counts the failure instead of refusing the whole dataset.
    assert merge_manifest(bad)["splits"]["train"]["quarantine_reasons"] == {"stream_failed": 1}
    healthy = dataclasses.replace(bad, val_shards=[f"{raw}/val/val-{{000000..000003}}.tar"])
    r = pretokenize(healthy, progress=False)
    assert (r["shards_done"], r["shards_skipped"]) == (2, 6)  # only the two failed shards are read again
    assert tree(tmp_path / "tok") == tree(d.token_dir)


@pytest.mark.e2e
def test_webdataset_and_wids_read_the_token_shards(raw_env, monkeypatch, tmp_path):
    import numpy as np
    import webdataset as wds

    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "wids_cache"))
    import wids

    tars = sorted((Path(raw_env.token_dir) / "train").glob("*.tar"))
    ours = [(k, m) for t in tars for k, m, err in iter_tar_samples(t)]
    theirs = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
              for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False)]
    assert theirs == ours and len(ours) > 100
    shards = [{"url": str(t), "nsamples": len(read_index(t)["samples"])} for t in tars]
    ds = wids.ShardListDataset(shards, localname=lambda url: url, transformations=[])
    assert len(ds) == len(ours)
    for i in (0, len(ds) // 2, len(ds) - 1):
        s, (key, m) = ds[i], ours[i]
        assert s["__key__"] == key and {k[1:]: v.getvalue() for k, v in s.items() if k.startswith(".")} == m
        assert np.load(io.BytesIO(m["ids.npy"])).dtype == np.int32 and json.loads(m["json"])["len"] > 0
