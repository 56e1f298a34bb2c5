"""The image tokenizer as one module, and its on-disk form: the released `image_tokenizer/` directory
(config.json with vision_config + vq_config, preprocessor_config.json, *.safetensors with keys `model.visual.*` and
`model.vqmodel.*`). A dir missing any used weight is refused (the official loader silently keeps random init).
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data_pipeline.image_tokenizer.vit import VisionConfig, VisionEncoder
from data_pipeline.image_tokenizer.vq import VQConfig, VQModel

PREFIXES = ("model.visual.", "model.vqmodel.")
UNUSED_KEYS = ("vqmodel.post_quant_conv.weight", "vqmodel.post_quant_conv.bias")


class ImageTokenizer(nn.Module):
    def __init__(self, vision: VisionConfig, vq: VQConfig, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        if vq.latent_channels != vision.hidden_size:
            raise ValueError(f"vq_config.latent_channels={vq.latent_channels} must equal vision_config.hidden_size="
                             f"{vision.hidden_size}")
        self.visual = VisionEncoder(vision)
        self.vqmodel = VQModel(vq)
        self.mean, self.std = tuple(mean), tuple(std)
        self.fingerprint = ""  # sha256 of the weights and configs once saved/loaded

    @property
    def patch_size(self) -> int:
        return self.visual.config.patch_size

    @property
    def codebook_size(self) -> int:
        return self.vqmodel.config.num_embeddings

    @torch.no_grad()
    def unit_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> unit vectors [B, gh*gw, embed_dim] (what the codebook is matched to)."""
        return self.vqmodel.project(self.visual(pixel_values))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> VQ ids [B, gh, gw] (raster order)."""
        b, _, h, w = pixel_values.shape
        p = self.patch_size
        return self.vqmodel.codes(self.unit_features(pixel_values)).view(b, h // p, w // p)

    @torch.no_grad()
    def encode_images(self, pixels: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
        """Images of any sizes ([3, H, W] each): grouped by size and batched; ids returned in input order."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, px in enumerate(pixels):
            groups[tuple(px.shape)].append(i)
        out: list[torch.Tensor | None] = [None] * len(pixels)
        dev = self.visual.patch_embed.proj.weight.device
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                ids = self.encode(torch.stack([pixels[i] for i in chunk]).to(dev)).cpu()
                for j, i in enumerate(chunk):
                    out[i] = ids[j]
        return out  # type: ignore[return-value]


def build_image_tokenizer(icfg) -> ImageTokenizer:
    """A seeded random tokenizer from `data.image_tokenizer` (ImageTokenizerConfig)."""
    vision = VisionConfig(hidden_size=icfg.hidden_size, intermediate_size=icfg.intermediate_size,
                          num_heads=icfg.num_heads, depth=icfg.depth, patch_size=icfg.patch_size,
                          image_size=icfg.image_size)
    vq = VQConfig(num_embeddings=icfg.num_embeddings, embed_dim=icfg.embed_dim, latent_channels=icfg.hidden_size)
    with torch.random.fork_rng():
        torch.manual_seed(icfg.seed)
        model = ImageTokenizer(vision, vq)
        init_weights(model)
    return model.eval()


def init_weights(model: ImageTokenizer) -> None:
    """SigLIP-style init: Linear and position table N(0, 0.02), zero biases; the patch conv keeps torch's default.

    Measured (docs/data.md): with torch's default nn.Embedding init N(0, 1) the position table dominates the
    residual stream of a random ViT, every flat colour lands on the same codes and the shapes detector recovers
    10% of scenes from code means. With this init the random ViT is close to a random linear projection of each
    patch's pixels (blocks add small residuals), which keeps colour and shape.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    nn.init.normal_(model.visual.embeddings.position_embedding.weight, std=0.02)


def _pick(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def save_image_tokenizer(model: ImageTokenizer, path: str | Path) -> str:
    """Write the official layout; returns the fingerprint."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    cfg = {"vision_config": asdict(model.visual.config), "vq_config": asdict(model.vqmodel.config)}
    pre = {"do_rescale": True, "do_normalize": True, "rescale_factor": 1 / 255, "image_mean": list(model.mean),
           "image_std": list(model.std), "patch_size": model.patch_size, "temporal_patch_size": 1,
           "merge_size": 1, "do_resize": False}
    (p / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (p / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True))
    sd = {"model." + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(p / "model.safetensors"))
    model.fingerprint = _fingerprint(p)
    return model.fingerprint


def _fingerprint(p: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p.glob("*.json")) + sorted(p.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def load_image_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> ImageTokenizer:
    p = Path(path)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"image tokenizer dir {p} has no config.json: set data.image_tokenizer.path to a "
                                f"released `image_tokenizer/` dir or run `unidiff tokenizer fit-codebook`")
    cfg = json.loads((p / "config.json").read_text())
    vision = _pick(VisionConfig, cfg.get("vision_config", cfg))
    vq = _pick(VQConfig, cfg.get("vq_config", cfg))
    pre_path = p / "preprocessor_config.json"
    if not pre_path.exists():
        raise FileNotFoundError(f"{pre_path} is missing (the official encoder opens it unconditionally)")
    pre = json.loads(pre_path.read_text())
    if pre.get("temporal_patch_size", 1) != 1 or pre.get("merge_size", 1) != 1:
        raise ValueError(f"{pre_path}: temporal_patch_size={pre.get('temporal_patch_size')} merge_size="
                         f"{pre.get('merge_size')}; the release uses 1 and 1 (other values break patch order)")
    if pre.get("patch_size", vision.patch_size) != vision.patch_size:
        raise ValueError(f"{pre_path}: patch_size={pre['patch_size']} != vision_config.patch_size="
                         f"{vision.patch_size}")
    model = ImageTokenizer(vision, vq, pre.get("image_mean", [0.5] * 3), pre.get("image_std", [0.5] * 3))
    index = p / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        sorted(f.name for f in p.glob("*.safetensors"))
    sd = {}
    for f in files:
        for k, v in load_file(str(p / f)).items():
            for pref in PREFIXES:
                if k.startswith(pref):
                    sd[k[len("model."):]] = v
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in UNUSED_KEYS]
    if missing or unexpected:
        raise ValueError(f"image tokenizer {p}: missing weights {missing[:5]} ({len(missing)}), unexpected "
                         f"{unexpected[:5]} ({len(unexpected)}); the dir does not match its config.json")
    model.fingerprint = _fingerprint(p)
    return model.to(device).eval()
