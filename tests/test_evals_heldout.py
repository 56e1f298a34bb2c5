"""Held-out items see images exactly as training did: for a tokenizer whose mean/std are not the 0.5 default, the
VQ ids of every held-out scene (prompt images and generation targets) equal the ids `unidiff pretokenize` wrote
for the same scene's raw sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """make-sample -> a random tokenizer saved with CLIP's mean/std -> pretokenize, and the held-out items."""
    from data_pipeline import layout
    from data_pipeline.image_tokenizer import build_image_tokenizer, load_image_tokenizer, save_image_tokenizer
    from data_pipeline.pretokenize import pretokenize
    from data_pipeline.sample import make_sample
    from data_pipeline.text_tokenizer import load_text_tokenizer, text_tokenizer_path
    from evals.heldout import build_shapes_heldout
    from training.config import load_config

    base = tmp_path_factory.mktemp("heldout")
    cfg = load_config(ROOT / "configs/model/tiny.yaml", [
        f"data.raw_dir={base / 'raw'}", f"data.token_dir={base / 'tokens'}",
        f"data.image_tokenizer.path={base / 'itok'}", "data.sample.train_scenes=2", "data.sample.val_scenes=5",
        "data.sample.train_docs=1", "data.sample.val_docs=1", "data.sample.shards_per_split=1",
        "data.pretokenize_workers=1"])
    make_sample(cfg.data.raw_dir, cfg.data.sample, progress=False)
    itok = build_image_tokenizer(cfg.data.image_tokenizer)
    itok.mean, itok.std = CLIP_MEAN, CLIP_STD
    save_image_tokenizer(itok, cfg.data.image_tokenizer.path)
    pretokenize(cfg.data, progress=False)
    tok = load_text_tokenizer(text_tokenizer_path(cfg.data))
    specials = layout.SpecialTokens.from_tokenizer(tok)
    itok = load_image_tokenizer(cfg.data.image_tokenizer.path)
    assert itok.mean == pytest.approx(CLIP_MEAN)  # the saved preprocessor_config carries them
    ho = build_shapes_heldout(cfg, tok, specials, itok, cfg.data.sample.val_scenes)
    return cfg, tok, specials, ho


def _pretokenized_grids(cfg, tok, specials) -> dict[tuple[str, str], np.ndarray]:
    """(raw sample key, task) -> the VQ grid pretokenize wrote for its image."""
    import io
    import json

    from data_pipeline import layout
    from data_pipeline.formats import iter_tar_samples
    from data_pipeline.manifest import load_manifest

    offset = load_manifest(cfg.data.token_dir)["vocab"]["image_token_offset"]
    out = {}
    for shard in sorted((Path(cfg.data.token_dir) / "val").glob("*.tar")):
        for _, members, err in iter_tar_samples(shard):
            assert err is None
            info = json.loads(members["json"])
            ids = np.load(io.BytesIO(members["ids.npy"]))
            grids = [s[1] for s in layout.decode_sequence(ids, tok, specials, offset) if s[0] == "image"]
            if grids:
                out[(info["meta"]["source_key"], info["task"])] = grids[0]
    return out


def _prompt_grid(prompt, tok, specials, offset) -> np.ndarray:
    from data_pipeline import layout

    (grid,) = [s[1] for s in layout.decode_sequence(prompt, tok, specials, offset) if s[0] == "image"]
    return grid


def test_heldout_vq_ids_equal_the_pretokenized_ids_of_the_same_image(run):
    cfg, tok, specials, ho = run
    written = _pretokenized_grids(cfg, tok, specials)
    offset = int(cfg.model.image_token_offset)
    assert len(ho.recon) == cfg.data.sample.val_scenes
    for i, (vqa, recon) in enumerate(zip(ho.vqa, ho.recon)):
        key = f"shapes-cap-val-{i:06d}"
        # Prompt images (understanding resize) and generation targets (generation crop), both modes.
        np.testing.assert_array_equal(_prompt_grid(vqa.prompt, tok, specials, offset), written[(key, "caption")],
                                      err_msg=f"understanding ids of held-out scene {i}")
        np.testing.assert_array_equal(recon.ids.numpy(), written[(key, "t2i")],
                                      err_msg=f"generation ids of held-out scene {i}")


def test_heldout_reconstruction_target_is_the_image_in_minus_one_one(run):
    """The decoders' target is the pixel image ([-1, 1]), not the tokenizer's normalisation of it."""
    from data_pipeline import shapes
    from data_pipeline.image_tokenizer.preprocess import to_pixel_values

    cfg, _, _, ho = run
    for t, r in zip(ho.t2i, ho.recon):
        assert r.image.min() >= -1.0 and r.image.max() <= 1.0
        # The shapes images are already at a generation size: the target is the render itself.
        assert r.image.shape[-1] == cfg.data.sample.image_size
        assert (r.image - to_pixel_values(shapes.render(t.scene))).abs().max() < 1e-6
