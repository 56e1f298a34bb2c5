"""Config section `tokenizer_train` (`unidiff tokenizer train`): SigLIP training of the image tokenizer's ViT against a
small text tower, then VQ training of its codebook. The ViT's own sizes are `data.image_tokenizer` (or the dir named
by `init_from`); the written dir goes to `data.image_tokenizer.path` unless `--out` says otherwise."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.config_errors import check as _check


@dataclass
class TokenizerTrainConfig:
    init_from: str = ""  # an `image_tokenizer/` dir to continue from (its ViT and codebook); "": from scratch
    seed: int = 0  # model init, batch order
    batch_size: int = 64  # image-text pairs per step over all data-parallel ranks (the SigLIP negatives)
    # --- phase 1: SigLIP (pairwise sigmoid loss, Zhai et al. 2023) ---
    siglip_steps: int = 300  # optimizer steps of the ViT + text tower
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    warmup_steps: int = 20
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    text_width: int = 64  # text tower: a small pre-LN transformer over the text tokenizer's ids
    text_depth: int = 2
    text_heads: int = 4
    text_max_len: int = 48  # caption tokens kept (longer captions are cut)
    embed_dim: int = 64  # shared image-text embedding width
    # --- phase 2: VQ (k-means init, then commitment loss + dead-code restarts; the ViT frozen) ---
    vq_steps: int = 200  # optimizer steps of quant_conv, the codebook and post_quant_conv
    vq_lr: float = 1.0e-3
    commitment: float = 0.25  # beta of ||z - sg(e)||^2 (VQ-VAE)
    pixel_weight: float = 1.0  # weight of the patch-pixel reconstruction from each code (0: features only)
    dead_code_after: int = 50  # a code unused for this many VQ steps is re-seeded from a feature of the batch
    kmeans_images: int = 2000  # images whose patch features initialise the codebook (data.image_tokenizer.kmeans_*)
    # --- run ---
    save_every: int = 100  # steps between periodic checkpoints (0: only at the end)
    keep_last: int = 2
    resume: str = "auto"  # auto: continue from the latest valid checkpoint of <run dir>/tokenizer | none
    log_every: int = 10
    stop_after: int = 0  # testing aid: stop (saving) after this many steps of this run; 0 = off

    def validate(self, root) -> None:
        p = "tokenizer_train"
        for key in ("batch_size", "text_width", "text_depth", "text_heads", "text_max_len", "embed_dim", "log_every",
                    "kmeans_images", "dead_code_after"):
            _check(getattr(self, key) >= 1, f"{p}.{key}", getattr(self, key), ">= 1")
        for key in ("siglip_steps", "vq_steps", "warmup_steps", "save_every", "stop_after"):
            _check(getattr(self, key) >= 0, f"{p}.{key}", getattr(self, key), ">= 0")
        _check(self.siglip_steps + self.vq_steps >= 1, f"{p}.siglip_steps", self.siglip_steps,
               f">= 1 or {p}.vq_steps >= 1 (nothing to train)")
        _check(self.text_width % self.text_heads == 0, f"{p}.text_width", self.text_width,
               f"divisible by {p}.text_heads={self.text_heads}")
        _check(not self.init_from or (Path(self.init_from) / "config.json").exists(), f"{p}.init_from",
               self.init_from, "empty (from scratch) or an image_tokenizer dir holding config.json")
        _check(self.pixel_weight >= 0, f"{p}.pixel_weight", self.pixel_weight, ">= 0")
        _check(self.resume in ("auto", "none"), f"{p}.resume", self.resume, "auto | none")
        _check(self.lr > 0 and self.vq_lr > 0 and 0 <= self.min_lr <= self.lr, f"{p}.lr", self.lr,
               f"> 0 with 0 <= {p}.min_lr <= lr and {p}.vq_lr > 0")
