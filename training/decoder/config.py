"""Config sections `decoder` (the image-token -> pixels DiT and its training) and `distill` (few-step student).

Architecture field names follow the released decoder's `config.json` (`ZImageTransformer2DModel`: dim, n_layers,
n_refiner_layers, n_heads, in_channels, cap_feat_dim, axes_dims, axes_lens, rope_theta, t_scale, norm_eps), so
`training.decoder.release.import_release` can read a released `decoder/config.json` into these fields.
Defaults are the toy scale: 64x64 pixels, 8x8 VQ grid, pixel latent, patch 8 -> 8x8 DiT tokens, width 128
(patch 4 -> 16x16 tokens with 2x id upsampling, as released, costs 5x more per step on 2 CPU cores).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from training.config_errors import check as _check


@dataclass
class DecoderConfig:
    # --- data geometry ---
    image_size: int = 64  # output pixels per side (square images at toy scale)
    token_grid: int = 8  # VQ id grid per side (image_size / tokenizer patch)
    codebook_size: int = 256  # VQ ids are in [0, codebook_size); released SigLIP-VQ: 16384
    data_source: str = "synthetic"  # synthetic (coloured id patches, known answer) | shards (data_pipeline, wired by lead)
    data_seed: int = 0  # seed of the synthetic palette / id grids
    holdout: int = 64  # synthetic pairs kept out of training for evaluation
    # --- latent space ---
    latent: str = "pixel"  # pixel (identity, toy) | vae (diffusers AutoencoderKL from vae_path, optional dependency)
    vae_path: str = ""  # local folder of a diffusers AutoencoderKL (FLUX VAE: 16 channels, /8)
    vae_scaling_factor: float = 0.3611  # FLUX VAE: z = (vae_latent - shift) * scale
    vae_shift_factor: float = 0.1159
    # --- DiT (names as in the released config.json) ---
    in_channels: int = 3  # latent channels (pixel: 3; FLUX VAE: 16)
    patch_size: int = 8  # latent pixels per DiT token side (released: 2); toy: 8x8 DiT grid
    dim: int = 128  # width (released: 3840)
    n_layers: int = 4  # main single-stream blocks (released: 30)
    n_refiner_layers: int = 1  # noise_refiner and context_refiner blocks each (released: 2)
    n_heads: int = 4  # attention heads; head_dim = dim / n_heads = sum(axes_dims)
    norm_eps: float = 1.0e-5
    qk_norm: bool = True  # RMSNorm on per-head q and k
    cap_feat_dim: int = 128  # SigVQ feature width (released: 4096)
    t_mid_dim: int = 256  # hidden width of the timestep MLP (released: 1024)
    t_scale: float = 1000.0  # t in [0,1] is multiplied by this before the sinusoidal embedding
    rope_theta: float = 256.0
    # RoPE ids of condition tokens: sequence = released, token k at (k+1, 0, 0) (the model must learn which token
    # belongs to which patch, feasible when fine-tuning the release); grid = token at (1, h, w) of its upsampled cell,
    # so attention finds its own cell by relative position (from scratch at toy scale the release layout stalled at
    # the unconditional loss within the CPU budget).
    cap_rope: str = "grid"
    # Also add each condition token's embedding to the latent patch of its cell (no new weights). Released: false.
    # From scratch on CPU the attention-only path stays near the unconditional loss for hundreds of steps (measured:
    # SigVQ gradient ~1e-5, loss flat at 0.49); the additive path gives the id -> cell link at step 0.
    cap_add: bool = True
    axes_dims: list[int] = field(default_factory=lambda: [8, 12, 12])  # RoPE dims over (sequence, h, w); sum = head_dim
    axes_lens: list[int] = field(default_factory=lambda: [1024, 512, 512])  # max position per RoPE axis
    sigvq_trainable: bool = True  # toy: learn the id embedding; released SigVQ weights are frozen
    init_from: str = ""  # optional: a released decoder folder (config.json + model.safetensors) or our checkpoint dir
    sigvq_from: str = ""  # optional: released image_tokenizer/sigvq_embedding.pt
    # --- flow-matching training ---
    engine: str = "native"  # native (single process / torch) | deepspeed (ZeRO data parallel)
    zero_stage: int = 1  # deepspeed only: 0 | 1 | 2
    train_steps: int = 600  # optimizer steps
    batch_size: int = 32  # pairs per rank per step
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4  # cosine decay floor
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995  # EMA of weights, used for sampling and saved alongside the raw weights
    t_sampling: str = "logit_normal"  # logit_normal | uniform
    # What the network outputs: velocity (released) | clean (x-prediction, converted to v = (x1_hat - x_t) / (1 - t)):
    # a pixel patch wider than the model (8x8x3 = 192 > dim) cannot carry per-pixel noise, x-prediction needs not.
    prediction: str = "velocity"
    prediction_t_clip: float = 0.05  # clean prediction: 1 - t is clamped to at least this in the conversion
    t_mean: float = 0.0  # logit-normal location (of logit t)
    t_std: float = 1.0  # logit-normal scale
    train_shift: float = 0.0  # time shift for training t; 0 = resolution-dependent (exp(mu), mu 0.5 @256 -> 1.15 @4096 tokens)
    cond_drop: float = 0.1  # probability a pair's condition is replaced by the null (all-zero) feature, for CFG
    seed: int = 1234
    save_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    resume: str = "auto"  # auto (latest in run_dir/decoder/checkpoints) | none
    log_every: int = 10
    # --- teacher sampling ---
    steps: int = 50  # Euler steps (model evaluations per image without CFG)
    sample_shift: float = 6.0  # time_shifting_factor: t' = t / (t + s - s t), more steps near noise
    cfg_scale: float = 1.0  # guidance w: pred = u + w (c - u); 1 = conditional only. Released cfg_scale=1.0 is w=2.0
    cfg_norm_clip: bool = True  # renormalise the guided prediction to the conditional norm when it is larger
    sampler: str = "euler"  # euler (teacher ODE) | turbo ("predict clean, re-noise"; set by distill for students)

    def validate(self, root) -> None:
        _check(self.data_source in ("synthetic", "shards"), "decoder.data_source", self.data_source,
               "synthetic | shards")
        _check(self.latent in ("pixel", "vae"), "decoder.latent", self.latent, "pixel | vae")
        _check(self.latent != "vae" or bool(self.vae_path), "decoder.vae_path", repr(self.vae_path),
               "a local diffusers AutoencoderKL folder when decoder.latent=vae")
        _check(self.engine in ("native", "deepspeed"), "decoder.engine", self.engine, "native | deepspeed")
        _check(self.zero_stage in (0, 1, 2), "decoder.zero_stage", self.zero_stage, "0 | 1 | 2")
        _check(self.dim % self.n_heads == 0, "decoder.dim", self.dim, f"divisible by decoder.n_heads={self.n_heads}")
        head = self.dim // max(self.n_heads, 1)
        _check(sum(self.axes_dims) == head and all(d % 2 == 0 for d in self.axes_dims), "decoder.axes_dims",
               self.axes_dims, f"even numbers summing to head_dim = dim / n_heads = {head}")
        _check(len(self.axes_lens) == len(self.axes_dims) == 3, "decoder.axes_lens", self.axes_lens,
               "three entries (sequence, h, w) like decoder.axes_dims")
        down = 1 if self.latent == "pixel" else 8
        lat = self.image_size // down
        _check(self.image_size % down == 0 and lat % self.patch_size == 0, "decoder.patch_size", self.patch_size,
               f"a divisor of the latent size {lat} (image_size={self.image_size} / {down})")
        tok = lat // self.patch_size
        _check(tok % self.token_grid == 0, "decoder.token_grid", self.token_grid,
               f"a divisor of the DiT token grid {tok} (ids are nearest-upsampled to it)")
        _check(self.latent != "pixel" or self.in_channels == 3, "decoder.in_channels", self.in_channels,
               "3 with decoder.latent=pixel")
        _check(self.prediction in ("velocity", "clean"), "decoder.prediction", self.prediction, "velocity | clean")
        _check(0 < self.prediction_t_clip < 1, "decoder.prediction_t_clip", self.prediction_t_clip, "in (0, 1)")
        _check(self.t_sampling in ("logit_normal", "uniform"), "decoder.t_sampling", self.t_sampling,
               "logit_normal | uniform")
        _check(0.0 <= self.cond_drop < 1.0, "decoder.cond_drop", self.cond_drop, "in [0, 1)")
        _check(0.0 <= self.ema_decay < 1.0, "decoder.ema_decay", self.ema_decay, "in [0, 1)")
        _check(self.steps >= 1, "decoder.steps", self.steps, ">= 1")
        _check(self.sample_shift > 0, "decoder.sample_shift", self.sample_shift, "> 0")
        _check(self.train_shift >= 0, "decoder.train_shift", self.train_shift, ">= 0 (0 = resolution-dependent)")
        _check(self.cap_rope in ("grid", "sequence"), "decoder.cap_rope", self.cap_rope, "grid | sequence")
        _check(self.sampler in ("euler", "turbo"), "decoder.sampler", self.sampler, "euler | turbo")
        _check(self.resume in ("auto", "none"), "decoder.resume", self.resume, "auto | none")
        _check(self.train_steps >= 1 and self.batch_size >= 1, "decoder.train_steps", self.train_steps,
               ">= 1 (and decoder.batch_size >= 1)")


METHODS = ("consistency_training", "consistency_distillation", "trajectory_distillation")


@dataclass
class DistillConfig:
    # consistency_training (teacher-free) | consistency_distillation | trajectory_distillation (frozen teacher)
    method: str = "trajectory_distillation"
    steps: int = 8  # student sampler steps (8, 4, 2 or 1)
    teacher: str = ""  # teacher checkpoint dir (train-decoder output); empty = <run_dir>/decoder/checkpoints
    substeps: int = 4  # fine-grid intervals per student interval (consistency grid N = steps * substeps)
    teacher_cfg_scale: float = 1.0  # guidance baked into the student (w; 1 = none)
    pool_size: int = 256  # trajectory_distillation: teacher trajectories sampled once, reused for every step
    train_steps: int = 400
    batch_size: int = 32
    lr: float = 2.0e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.99  # EMA of the student weights; the EMA is what is exported
    loss: str = "pseudo_huber"  # l2 | pseudo_huber (c = 0.00054 * sqrt(dim), iCT)
    seed: int = 4321
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto (latest valid in run_dir/distill/checkpoints) | none
    log_every: int = 10

    def validate(self, root) -> None:
        _check(self.resume in ("auto", "none"), "distill.resume", self.resume, "auto | none")
        _check(self.method in METHODS, "distill.method", self.method, " | ".join(METHODS))
        _check(self.pool_size >= 1, "distill.pool_size", self.pool_size, ">= 1")
        _check(self.steps in (1, 2, 4, 8, 16), "distill.steps", self.steps, "1 | 2 | 4 | 8 | 16")
        _check(self.substeps >= 1, "distill.substeps", self.substeps, ">= 1")
        _check(self.loss in ("l2", "pseudo_huber"), "distill.loss", self.loss, "l2 | pseudo_huber")
        _check(0.0 <= self.ema_decay < 1.0, "distill.ema_decay", self.ema_decay, "in [0, 1)")
        _check(self.train_steps >= 1, "distill.train_steps", self.train_steps, ">= 1")
