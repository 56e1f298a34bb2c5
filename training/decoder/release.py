"""Import of the released LLaDA2.0-Uni decoder (`decoder/` or `decoder-turbo/` + `image_tokenizer/sigvq_embedding.pt`).

Covered: every DiT weight of the basic (non-omni) ZImageTransformer2DModel loads by name into `TokenDecoder.
transformer` (x embedder and final layer under the "<patch>-1" key, refiners, layers, t_embedder, semantic_embedder,
pad tokens), and SigVQ into `TokenDecoder.sigvq`. Not covered: the omni/siglip branch (siglip_* weights; absent in
the release config) and the VAE, which is loaded separately by `decoder.latent=vae`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.decoder.decode import load_decoder

# released config.json key -> DecoderConfig field (others are ignored or checked)
_CONFIG_KEYS = {"dim": "dim", "n_layers": "n_layers", "n_refiner_layers": "n_refiner_layers", "n_heads": "n_heads",
                "in_channels": "in_channels", "norm_eps": "norm_eps", "qk_norm": "qk_norm", "cap_feat_dim": "cap_feat_dim",
                "rope_theta": "rope_theta", "t_scale": "t_scale", "axes_dims": "axes_dims", "axes_lens": "axes_lens"}


def config_overrides(release_dir: str | Path) -> dict:
    """DecoderConfig fields from a released decoder/config.json (decode.py overrides cap_feat_dim=4096, axes_lens)."""
    raw = json.loads((Path(release_dir) / "config.json").read_text())
    out = {ours: raw[theirs] for theirs, ours in _CONFIG_KEYS.items() if theirs in raw}
    out["cap_feat_dim"] = 4096
    out["axes_lens"] = [32768, 1024, 1024]
    out["patch_size"] = int(raw.get("all_patch_size", [2])[0])
    out.update(latent="vae", t_mid_dim=1024, codebook_size=16384, cap_rope="sequence", cap_add=False)
    if raw.get("siglip_feat_dim") is not None:
        raise ValueError(f"{release_dir}: siglip_feat_dim={raw['siglip_feat_dim']} (omni variant) is not supported")
    return out


def load_weights(model, source: str | Path, sigvq_path: str | Path = "") -> None:
    """Released model.safetensors (strict) into model.transformer; optional sigvq_embedding.pt into model.sigvq."""
    source = Path(source)
    if (source / "model.safetensors").exists():
        sd = load_file(str(source / "model.safetensors"))
        missing, unexpected = model.transformer.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"decoder.init_from={source}: weights do not match decoder.* config; "
                             f"missing {missing[:5]}..., unexpected {unexpected[:5]}...")
    else:  # one of our own checkpoints
        src, _ = load_decoder(source)
        model.load_state_dict(src.state_dict())
    if sigvq_path:
        model.sigvq.load_state_dict(torch.load(sigvq_path, map_location="cpu", weights_only=True))
