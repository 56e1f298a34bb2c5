"""SigLIP-VQ tokenizer: parity with an independent brute-force forward in the official formulation, the released
directory layout, preprocessing reference values, and the sample text tokenizer."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from data_pipeline.config import ImageTokenizerConfig
from data_pipeline.image_tokenizer.load import build_image_tokenizer, load_image_tokenizer, save_image_tokenizer
from data_pipeline.image_tokenizer.preprocess import (generate_crop_size_list, resize_for_understanding,
                                                      smart_resize, var_center_crop)


def brute_force_ids(sd: dict, cfg: dict, px: torch.Tensor) -> torch.Tensor:
    """Official formulation: rows of flattened patches (c, y, x) @ W^T, grid_sample'd position table, per-head
    attention written out, cosine VQ as argmin of |z|^2+|e|^2-2z.e — float64, no shared code with the module."""
    v, q = cfg["vision_config"], cfg["vq_config"]
    p, d, H = v["patch_size"], v["hidden_size"], v["num_heads"]
    g = {k[len("model."):]: t.double() for k, t in sd.items()}
    _, h, w = px.shape
    gh, gw = h // p, w // p
    rows = px.double().view(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3 * p * p)
    x = rows @ g["visual.patch_embed.proj.weight"].view(d, -1).t() + g["visual.patch_embed.proj.bias"]
    tab = g["visual.embeddings.position_embedding.weight"]
    s = int(math.isqrt(tab.shape[0]))
    ys = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh * 2 - 1
    xs = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]  # (1, gh, gw, 2) as (x, y)
    pos = F.grid_sample(tab.view(1, s, s, d).permute(0, 3, 1, 2), grid, mode="bilinear", align_corners=False,
                        padding_mode="border")[0].permute(1, 2, 0).reshape(gh * gw, d)
    x = x + pos
    for i in range(v["depth"]):
        b = lambda n: g[f"visual.blocks.{i}.{n}"]  # noqa: E731
        y = F.layer_norm(x, (d,), b("norm1.weight"), b("norm1.bias"), 1e-6)
        qkv = (y @ b("attn.qkv.weight").t() + b("attn.qkv.bias")).view(-1, 3, H, d // H)
        heads = []
        for hh in range(H):
            qq, kk, vv = qkv[:, 0, hh], qkv[:, 1, hh], qkv[:, 2, hh]
            heads.append(torch.softmax(qq @ kk.t() / math.sqrt(d // H), -1) @ vv)
        x = x + torch.cat(heads, -1) @ b("attn.proj.weight").t() + b("attn.proj.bias")
        y = F.layer_norm(x, (d,), b("norm2.weight"), b("norm2.bias"), 1e-6)
        y = F.gelu(y @ b("mlp.fc1.weight").t() + b("mlp.fc1.bias"))
        x = x + y @ b("mlp.fc2.weight").t() + b("mlp.fc2.bias")
    z = x @ g["vqmodel.quant_conv.weight"].view(q["embed_dim"], -1).t() + g["vqmodel.quant_conv.bias"]
    z = F.normalize(z, dim=-1)
    e = F.normalize(g["vqmodel.quantize.embedding.weight"], dim=-1)
    dist = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z @ e.t()
    return dist.argmin(1).view(gh, gw)


@pytest.mark.unit
@pytest.mark.parametrize("hw", [(64, 64), (48, 80), (96, 32)])
def test_vit_vq_matches_brute_force_and_layout(tmp_path, hw):
    icfg = ImageTokenizerConfig(num_embeddings=64)
    m = build_image_tokenizer(icfg)
    with torch.no_grad():  # random codebook directions, and larger weights so blocks matter
        m.vqmodel.quantize.embedding.weight.normal_()
        for n, prm in m.visual.named_parameters():
            if "blocks" in n or "position" in n:
                prm.normal_(std=0.2)
    save_image_tokenizer(m, tmp_path / "tok")
    sd = load_file(str(tmp_path / "tok/model.safetensors"))
    assert all(k.startswith(("model.visual.", "model.vqmodel.")) for k in sd)
    assert sd["model.visual.blocks.1.attn.qkv.weight"].shape == (192, 64)
    assert sd["model.visual.embeddings.position_embedding.weight"].shape == (64, 64)
    cfg = json.loads((tmp_path / "tok/config.json").read_text())
    loaded = load_image_tokenizer(tmp_path / "tok")
    px = torch.rand(3, *hw) * 2 - 1
    ids = loaded.encode(px[None])[0]
    ref = brute_force_ids(sd, cfg, px)
    assert (ids == ref).float().mean() >= 0.99  # float32 vs float64: a near-tie may flip
    assert torch.equal(loaded.encode(px[None])[0], m.encode(px[None])[0])


@pytest.mark.unit
def test_loader_refuses_incomplete_dir(tmp_path):
    m = build_image_tokenizer(ImageTokenizerConfig())
    save_image_tokenizer(m, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.visual.blocks.0.mlp.fc1.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing weights"):
        load_image_tokenizer(tmp_path)


@pytest.mark.unit
def test_preprocessing_reference_values():
    assert smart_resize(1000, 1500, 32, 128 ** 2, 800 ** 2) == (640, 960)
    assert smart_resize(64, 64, 32, 128 ** 2, 800 ** 2) == (128, 128)
    assert smart_resize(512, 512, 32, 128 ** 2, 800 ** 2) == (512, 512)
    sizes = generate_crop_size_list(256, 32)
    assert len(sizes) == 49 and (512, 512) in sizes and (608, 416) in sizes
    assert all((w // 32) * (h // 32) <= 256 and max(w, h) / min(w, h) <= 4 for w, h in sizes)
    img = Image.new("RGB", (1500, 1000), (10, 20, 30))
    assert var_center_crop(img, sizes).size == (608, 416)
    small = var_center_crop(Image.new("RGB", (64, 64), (255, 255, 255)), sizes)
    a = np.asarray(small)
    assert small.size == (512, 512) and a[:64, :64].min() == 255 and a[64:].max() == 0  # unscaled, black pad
    assert var_center_crop(Image.new("RGB", (64, 64)), sizes, scale=True).size == (512, 512)
    out = resize_for_understanding(Image.new("RGBA", (300, 200), (0, 0, 0, 0)), 32, 128 ** 2, 800 ** 2)
    assert out.size == (288, 192) and np.asarray(out).min() == 255  # transparent -> white


@pytest.mark.unit
def test_sample_text_tokenizer(tmp_path):
    from data_pipeline import layout
    from data_pipeline.text_tokenizer import build_sample_tokenizer, load_text_tokenizer, vocab_layout
    texts = ["a red circle at the top left.", "what color is the square?", "blue"] * 20
    tok = build_sample_tokenizer(texts, tmp_path / "tokenizer.json", vocab_size=1024)
    tok = load_text_tokenizer(tmp_path / "tokenizer.json")
    assert tok.vocab_size == 1024 and vocab_layout(tok, 256) == (1024, 1280)
    sp = layout.SpecialTokens.from_tokenizer(tok)
    assert sp.max_grid == 128 and sp.role_start >= 0
    for s in ["héllo wörld ✓ 123", "<role>HUMAN</role>what color is the circle?<role>ASSISTANT</role>red"]:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("what color is the circle?")) <= 8  # world words are whole tokens
    assert tok.encode("<|image|><|reserved_token_8|><boi>") == [sp.image_start, sp.grid(8), sp.boi]
