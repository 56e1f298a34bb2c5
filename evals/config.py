"""Config section `eval`: which tasks run, on what, and how many samples each uses."""
from __future__ import annotations

from dataclasses import dataclass, field

from training.config_errors import ConfigError

TASK_NAMES = ("elbo", "choice", "vqa", "caption", "t2i", "reconstruction", "speed")
ESTIMATORS = ("t", "l")
SAMPLINGS = ("stratified", "antithetic", "iid")


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))  # default for `unidiff eval` (--tasks overrides)
    checkpoint: str = ""  # backbone: "" = latest valid in <run_dir>/checkpoints | a checkpoint dir | an HF dir | none
    decoder_teacher: str = ""  # "" = <run_dir>/decoder/checkpoints (train-decoder) | a dir | none
    decoder_student: str = ""  # "" = <run_dir>/distill/checkpoints (distill) | a dir | none
    out_dir: str = ""  # "" = <run_dir>/eval: report.json, report.md, PNG figures
    split: str = "val"  # held-out split of the shapes world (never trained on)
    num_samples: int = 32  # held-out items per task (per scene-based task; elbo uses this many sequences)
    batch_size: int = 16  # rows per backbone forward (likelihood tasks)
    seed: int = 0  # seeds every Monte Carlo draw and sampler; draws are keyed by item, not by rank
    # --- elbo / choice: Monte Carlo estimate of the masked-diffusion negative ELBO ---
    elbo_mc: int = 8  # Monte Carlo draws per held-out sequence
    elbo_estimator: str = "t"  # t: mask prob t, weight 1/t (MDLM) | l: mask exactly l of L tokens, weight L/l (LLaDA)
    elbo_sampling: str = "stratified"  # stratified ((j+u_j)/M) | antithetic (u, 1-u pairs) | iid
    elbo_block_size: int = -1  # -1 = last entry of diffusion.block_schedule; 0 = whole sequence (MDLM)
    elbo_eps: float = 1e-3  # t is never below this (t estimator)
    choice_mc: int = 8  # Monte Carlo draws per (question, candidate); LLaDA uses 128 (1 for 1-token answers)
    choice_normalize: str = "sum"  # sum: total NELBO of the answer (LLaDA) | mean: per answer token
    # understanding tasks (vqa, choice, caption) also score the same items with the prompt's image tokens masked
    # (the image-blind control, evals/controls.py); costs a second pass over their items
    image_blind: bool = True
    # --- vqa / caption: answers generated with the block sampler ---
    vqa_gen_length: int = 8  # max answer tokens (shapes answers are 1-2 words)
    caption_gen_length: int = 32  # max caption tokens
    caption_prompt: str = ""  # caption-task question; "" = the one pretokenize trains with (data_pipeline.pretokenize)
    # --- t2i / reconstruction ---
    t2i_cfg_scale: float = -1.0  # -1 = diffusion.cfg_scale
    decoder_steps: int = 0  # 0 = each decoder checkpoint's own default (teacher ~50, student <= 8)
    grid_images: int = 8  # images per sample-grid figure
    # --- speed ---
    speed_repeats: int = 2  # timed repetitions (after one warm-up) of each measurement
    speed_gen_length: int = 64  # text tokens generated per timed prompt
    progress: bool = True  # tqdm bars on long tasks

    def validate(self, root) -> None:
        def check(ok, key, value, allowed):
            if not ok:
                raise ConfigError(f"eval.{key}={value} is not allowed: must be {allowed}")

        for t in self.tasks:
            check(t in TASK_NAMES, "tasks", list(self.tasks), "a list of " + " | ".join(TASK_NAMES))
        check(self.elbo_estimator in ESTIMATORS, "elbo_estimator", self.elbo_estimator, " | ".join(ESTIMATORS))
        check(self.elbo_sampling in SAMPLINGS, "elbo_sampling", self.elbo_sampling, " | ".join(SAMPLINGS))
        check(self.elbo_sampling != "antithetic" or self.elbo_mc % 2 == 0, "elbo_mc", self.elbo_mc,
              "even with eval.elbo_sampling=antithetic (draws come in pairs)")
        check(self.choice_normalize in ("sum", "mean"), "choice_normalize", self.choice_normalize, "sum | mean")
        check(self.split in ("train", "val"), "split", self.split, "train | val")
        for key in ("num_samples", "batch_size", "elbo_mc", "choice_mc", "vqa_gen_length", "caption_gen_length",
                    "grid_images", "speed_repeats", "speed_gen_length"):
            check(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")
        check(self.elbo_block_size >= -1, "elbo_block_size", self.elbo_block_size, ">= -1")
        check(0.0 < self.elbo_eps < 1.0, "elbo_eps", self.elbo_eps, "in (0, 1)")
        check(self.decoder_steps >= 0, "decoder_steps", self.decoder_steps, ">= 0")
