"""Config section `distill_backbone`: parallel-decoding distillation of the backbone (training/backbone_distill)."""
from __future__ import annotations

from dataclasses import dataclass, field

from training.config_errors import ConfigError

METHODS = ("path", "dparallel")


@dataclass
class DistillBackboneConfig:
    method: str = "path"  # path: train on the model's own verified trajectories | dparallel: certainty forcing
    # dparallel: weight of the entropy on masked positions already predicted correctly; it is diffusion.cap_lambda
    # (the same term, docs/finetune.md section 3), set from here for the run. 2.0 is dFactory's recommendation.
    confidence_beta: float = 2.0
    # path: where the trajectories are sampled from ("" = the run's latest valid checkpoint, else train.init_from;
    # or a checkpoint step dir / HF dir)
    checkpoint: str = ""
    trajectories: str = ""  # path: their token dir ("" = <run dir>/trajectories); an existing one is reused
    tasks: list[str] = field(default_factory=lambda: ["vqa", "caption"])  # prompts of these tasks of data.token_dir
    split: str = "train"  # the split of data.token_dir whose prompts are sampled
    max_prompts: int = 0  # 0 = every prompt of the split's tasks
    batch_size: int = 8  # prompts (of one length) per sampler call
    # exact: the answer (up to EOS) equals the reference token for token (the shapes world's answers) |
    # module:function called as f(prompt_ids, answer_ids, reference_ids) -> bool (lists of ints)
    verifier: str = "exact"
    generate_only: bool = False  # path: write the trajectories and stop (then train them on many ranks)

    def validate(self, root) -> None:
        def check(ok, key, value, allowed):
            if not ok:
                raise ConfigError(f"distill_backbone.{key}={value} is not allowed: must be {allowed}")

        check(self.method in METHODS, "method", self.method, " | ".join(METHODS))
        check(self.confidence_beta >= 0, "confidence_beta", self.confidence_beta, ">= 0")
        check(self.verifier == "exact" or self.verifier.count(":") == 1, "verifier", self.verifier,
              "exact or module:function")
        check(self.max_prompts >= 0, "max_prompts", self.max_prompts, ">= 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        known = ("caption", "vqa")
        check(bool(self.tasks) and all(t in known for t in self.tasks), "tasks", self.tasks,
              f"a non-empty list of {' | '.join(known)} (text answers)")
