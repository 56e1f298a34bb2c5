"""The fast writers pretokenize uses give the bytes of the standard ones: tarfile (USTAR) and np.save; the
vectorised normalisation gives `to_pixel_values` of every image bit for bit."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.image_tokenizer.preprocess import normalise, to_pixel_values
from data_pipeline.tar_writer import npy_bytes, tarinfo, write_tar

pytestmark = pytest.mark.unit


def test_tar_bytes_and_offsets_equal_tarfile(tmp_path):
    samples = [(f"k{i}-x", {"ids.npy": bytes(range(256)) * (i % 7), "json": b'{"a": 1}', "z.png": b"x" * (i * 37)})
               for i in range(120)]
    samples.append(("d" * 60 + "/" + "a" * 60, {"bin": b"a name over 100 bytes: USTAR prefix"}))
    ours = write_tar(tmp_path / "ours.tar", samples)
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for k, m in samples:
            for ext in sorted(m):
                tf.addfile(tarinfo(f"{k}.{ext}", len(m[ext])), io.BytesIO(m[ext]))
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    with tarfile.open(tmp_path / "ref.tar") as tf:
        ref = {}
        for mem in tf.getmembers():
            k, _, ext = mem.name.partition(".")
            ref.setdefault(k, {})[ext] = (mem.offset_data, mem.size)
    assert ours == ref
    assert not (tmp_path / "ours.tar.tmp").exists()
    with pytest.raises(ValueError, match="contains '.'"):
        write_tar(tmp_path / "bad.tar", [("a.b", {"txt": b""})])


@pytest.mark.parametrize("a", [np.arange(5, dtype=np.int32), np.zeros(0, bool), np.ones(70000, np.uint8),
                               np.arange(6, dtype=np.int64).reshape(2, 3), np.arange(3, dtype=np.float32)[::2]])
def test_npy_bytes_equal_np_save(a):
    b = io.BytesIO()
    np.save(b, a, allow_pickle=False)
    assert npy_bytes(a) == b.getvalue()


@pytest.mark.parametrize("mean,std", [(0.5, 0.5), ((0.48, 0.45, 0.40), (0.26, 0.26, 0.27))])
def test_batch_normalisation_equals_per_image(mean, std):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in range(5)]
    m = torch.tensor(mean).view(3, 1, 1) if isinstance(mean, tuple) else mean
    s = torch.tensor(std).view(3, 1, 1) if isinstance(std, tuple) else std
    # the formula as written before the batch version: float32 HWC -> CHW, x/255, -mean, /std
    ref = [(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0 - m) / s
           for im in images]
    batch = normalise(np.stack([np.asarray(im) for im in images]), mean, std)
    assert batch.is_contiguous() and batch.shape == (5, 3, 24, 40)
    assert all(torch.equal(r, b) for r, b in zip(ref, batch))
    assert all(torch.equal(r, to_pixel_values(im, mean, std)) for r, im in zip(ref, images))
    out = torch.full((5 * 3 * 24 * 40 + 7,), float("nan"))
    normalise(np.stack([np.asarray(im) for im in images]), mean, std, out=out[:5 * 3 * 24 * 40].view(5, 3, 24, 40))
    assert torch.equal(out[:5 * 3 * 24 * 40].view(5, 3, 24, 40), batch)
