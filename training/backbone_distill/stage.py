"""`unidiff distill-backbone CONFIG`: parallel-decoding distillation of the backbone, on the trainer (training/trainer.py:
same engines, checkpoints, resume, tracker; no second loop). distill_backbone.method:

  path       1. trajectories (once; an existing dir is reused): the model's own block-sampler decodes of the training
                prompts, from distill_backbone.checkpoint, else the run's latest checkpoint, else train.init_from;
                verified ones written as token shards (trajectories.py);
             2. the trainer on them: each block masked at a cut of its trajectory (a state s_i the sampler visited),
                every token revealed at a later step a target (s_i -> the block's end state in one forward).
  dparallel  the trainer with the certainty-forcing term on: diffusion.cap_lambda = distill_backbone.confidence_beta.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

from training.config_errors import ConfigError


def trajectory_source(cfg) -> str:
    """The checkpoint the trajectories are sampled from (docstring above)."""
    from training.checkpoint import CheckpointManager

    db = cfg.distill_backbone
    if db.checkpoint:
        return db.checkpoint
    latest = CheckpointManager(cfg.run_dir).latest_valid()
    if latest is not None:
        return str(latest)
    if cfg.train.init_from:
        return cfg.train.init_from
    raise ConfigError("distill_backbone.method=path samples trajectories from a trained backbone: set "
                      "train.init_from=HF_DIR (an `unidiff convert hf-export` of the model) or "
                      "distill_backbone.checkpoint=DIR")


def _check_path(cfg) -> None:
    from training.diffusion.schedule import block_size_at

    d = cfg.diffusion
    sizes = {b for _, b in d.block_schedule}
    if sizes != {d.sample_block_length} or block_size_at(d.block_schedule, 0, cfg.train.seq_len) != \
            d.sample_block_length:
        raise ConfigError(f"distill_backbone.method=path trains on the sampler's blocks: diffusion.block_schedule="
                          f"{d.block_schedule} must be one block size equal to diffusion.sample_block_length="
                          f"{d.sample_block_length}")
    if d.complementary:
        raise ConfigError("distill_backbone.method=path: diffusion.complementary=true is not allowed (the inverse "
                          "of a trajectory state is not a state the sampler visits); set it to false")


def prepare(cfg):
    """-> the config the trainer runs (for path: with its trajectory dir as data, written first when missing),
    or None when distill_backbone.generate_only stops after the trajectories."""
    db = cfg.distill_backbone
    run = copy.deepcopy(cfg)
    if db.method == "dparallel":
        run.diffusion.cap_lambda = db.confidence_beta
        return run
    _check_path(cfg)
    out = Path(db.trajectories) if db.trajectories else cfg.run_dir / "trajectories"
    if not (out / "manifest.json").exists():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"distill-backbone on {os.environ['WORLD_SIZE']} ranks found no trajectories at {out}: "
                              f"write them first in one process (distill_backbone.generate_only=true), then launch")
        from training.backbone_distill.trajectories import make_trajectories

        manifest = make_trajectories(cfg, out, trajectory_source(cfg))
        if not manifest["splits"].get("train", {}).get("token_samples"):
            raise ValueError(f"no trajectory passed distill_backbone.verifier={db.verifier} ({out}/manifest.json "
                             f"lists the reasons): train the model further or loosen the verifier")
    else:
        print(f"distill-backbone: reusing the trajectories in {out}", file=sys.stderr, flush=True)
    if db.generate_only:
        return None
    run.data.token_dir, run.data.datasets, run.data.split, run.data.synthetic = str(out), {}, "train", False
    run.data.pad_to_block = True  # documents start on a block boundary, as the sampler's blocks do
    return run


def distill_backbone(cfg) -> dict:
    from training.trainer import train

    run = prepare(cfg)
    return {} if run is None else train(run)
