"""Config section `diffusion`: the masked / block diffusion objective (training) and sampler defaults (generate)."""
from __future__ import annotations

from dataclasses import dataclass, field

from training.config_errors import ConfigError
from training.diffusion.schedule import validate_block_schedule

SCHEDULES = ("linear", "cosine")
NORMALIZE = ("token", "sequence")
STRATEGIES = ("low_confidence", "top_k_margin", "neg_entropy")


@dataclass
class DiffusionConfig:
    # Block-size schedule as [[step, block_size], ...]: from `step` on, use `block_size`; 0 means the whole
    # sequence (MDLM, x_t half only). The LLaDA2.0 WSD schedule is e.g. [[0,1],[100,4],[200,32],[300,0],[900,32]].
    block_schedule: list[list[int]] = field(default_factory=lambda: [[0, 32]])
    # --- noising ---
    schedule: str = "linear"  # linear (mask prob = t, ELBO weight 1/t) | cosine (mask prob = 1 - cos(pi t / 2))
    mask_low: float = 0.0  # t ~ U[mask_low, mask_high] (the mask-ratio bandwidth; for linear, t is the mask ratio)
    mask_high: float = 1.0
    mask_eps: float = 1e-3  # t is never below this (keeps the 1/t weight finite)
    t_per_block: bool = False  # BD3-LM: one t per block instead of one per sample
    stratified_t: bool = True  # low-discrepancy t over the batch ((i + u) / n), lower-variance ELBO estimate
    complementary: bool = False  # add the inverse mask of every sample to the batch (LLaDA2.0 SFT); doubles compute
    # --- loss ---
    elbo_weight: bool = True  # weight each masked token by -alpha'_t / (1 - alpha_t) (1/t for linear); off = plain CE
    normalize: str = "sequence"  # sequence: divide by #maskable tokens (NELBO per token) | token: by #masked tokens
    loss_weight_text: float = 1.0  # multiplies the text part of the loss
    loss_weight_image: float = 1.0  # multiplies the image part of the loss
    cap_lambda: float = 0.0  # CAP: weight of the entropy on masked positions already predicted correctly (2.0 in dFactory)
    loss_chunk: int = 2048  # masked rows per LM-head chunk: its fp32 logits (chunk x vocab) are the head's peak, and
    # are recomputed in the backward; never the full [B, L, vocab]
    # (CFG condition dropout happens when the data are written: data.t2i_uncond_prob at pretokenize)
    # --- stabilisation (LLaDA2.0): Gaussian noise on the mask-token embedding for the first steps ---
    mask_embed_noise_std: float = 0.0  # std of the noise added to embeddings at masked positions (0 = off)
    mask_embed_noise_steps: int = 0  # apply it for steps < this
    # --- sampler defaults (`unidiff generate`, evals) ---
    sample_block_length: int = 32  # tokens per decoding block
    sample_steps: int = 32  # denoising steps per block (text); upper bound with threshold acceptance
    sample_image_steps: int = 8  # steps per block for image tokens
    sample_threshold: float = 0.95  # accept every token whose probability exceeds this (>= 1 disables)
    sample_strategy: str = "low_confidence"  # low_confidence | top_k_margin | neg_entropy
    sample_temperature: float = 0.0  # 0 = greedy
    sample_gen_length: int = 256  # max new text tokens
    cfg_scale: float = 2.0  # text-to-image logit-space guidance scale (1 = conditional only)
    cfg_rescale: float = 0.0  # 0 = off; 0.7 in sglang-omni
    cfg_text_scale: float = 4.0  # editing: instruction guidance
    cfg_image_scale: float = 0.0  # editing: source-image guidance

    def validate(self, root) -> None:
        def check(ok, key, value, allowed):
            if not ok:
                raise ConfigError(f"diffusion.{key}={value} is not allowed: must be {allowed}")

        check(self.schedule in SCHEDULES, "schedule", self.schedule, " | ".join(SCHEDULES))
        check(self.normalize in NORMALIZE, "normalize", self.normalize, " | ".join(NORMALIZE))
        check(self.sample_strategy in STRATEGIES, "sample_strategy", self.sample_strategy, " | ".join(STRATEGIES))
        check(0.0 <= self.mask_low <= 1.0, "mask_low", self.mask_low, "in [0, 1]")
        check(0.0 < self.mask_high <= 1.0, "mask_high", self.mask_high, "in (0, 1]")
        check(self.mask_low <= self.mask_high, "mask_low", self.mask_low,
              f"<= diffusion.mask_high={self.mask_high}")
        check(0.0 < self.mask_eps < self.mask_high, "mask_eps", self.mask_eps,
              f"in (0, diffusion.mask_high={self.mask_high})")
        for key in ("loss_weight_text", "loss_weight_image", "cap_lambda", "mask_embed_noise_std", "cfg_rescale"):
            check(getattr(self, key) >= 0.0, key, getattr(self, key), ">= 0")
        check(self.loss_weight_text + self.loss_weight_image > 0, "loss_weight_text", self.loss_weight_text,
              "> 0 when diffusion.loss_weight_image is 0")
        check(self.loss_chunk >= 1, "loss_chunk", self.loss_chunk, ">= 1 (masked rows per LM-head chunk)")
        check(self.mask_embed_noise_steps >= 0, "mask_embed_noise_steps", self.mask_embed_noise_steps, ">= 0")
        check(self.sample_block_length >= 1, "sample_block_length", self.sample_block_length, ">= 1")
        check(self.sample_steps >= 1, "sample_steps", self.sample_steps, ">= 1")
        check(self.sample_image_steps >= 1, "sample_image_steps", self.sample_image_steps, ">= 1")
        check(self.sample_temperature >= 0, "sample_temperature", self.sample_temperature, ">= 0")
        check(self.sample_gen_length >= 1, "sample_gen_length", self.sample_gen_length, ">= 1")
        validate_block_schedule(self.block_schedule, root.train.seq_len)
