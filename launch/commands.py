"""The command handlers of the CLI, each `(cfg, args) -> exit code`: thin over the library's typed entries (model info,
HF import/export, train, data make-sample, tokenizer fit-codebook / train, pretokenize, eval, generate). The flags are in
launch/registry.py."""
from __future__ import annotations

import dataclasses
import json
import os

from pathlib import Path

from omegaconf import OmegaConf

from training.config import ConfigError


def cmd_model_info(cfg, args) -> int:
    from training.model import build_model, count_params

    counts = count_params(build_model(cfg.model, "meta"))
    if args.json:
        print(json.dumps(counts))
    else:
        for k, v in counts.items():
            print(f"{k:>28}: {v:,}" if isinstance(v, int) else f"{k:>28}: {v}")
    return 0


def cmd_hf_import(cfg, args) -> int:
    """Validate an HF checkpoint against its config.json without loading it (safetensors headers, meta model),
    then write a model preset whose numbers match it."""
    from training.hf_format import iter_hf_tensors, read_hf_config
    from training.model import build_model

    src = Path(args.src)
    mcfg = read_hf_config(src, cfg.model)
    shapes = {k: tuple(v.shape) for k, v in build_model(mcfg, "meta").state_dict().items()}
    seen = 0
    for t in iter_hf_tensors(src):  # headers only: no tensor is read
        want = shapes.get(t.target)
        if want is None:
            raise ConfigError(f"unexpected weight {t.key} for this config.json")
        if not t.fits(want):
            raise ConfigError(f"{t.key}: shape {t.shape} does not match config.json ({want})")
        seen += 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = OmegaConf.to_yaml(OmegaConf.create({"model": dataclasses.asdict(mcfg)}))
    out.write_text(f"# Model preset imported from {src} by `unidiff convert hf-import`.\n"
                   f"# Train from these weights with: unidiff train CONFIG.yaml train.init_from={src}\n{body}")
    print(f"checked {seen} tensors in {src}; wrote {out}")
    return 0


def _checkpoint_arg(cfg, args) -> Path:
    from training.checkpoint import CheckpointManager

    ckpt = Path(args.checkpoint) if args.checkpoint else CheckpointManager(cfg.run_dir).latest_valid()
    if ckpt is None:
        raise ConfigError(f"no valid checkpoint under {cfg.run_dir / 'checkpoints'}; pass --checkpoint DIR")
    return ckpt


def cmd_hf_export(cfg, args) -> int:
    """Read a checkpoint saved under any engine and layout (no process group needed) and write it in HF format:
    `--layout released` (per-expert keys, as the HF releases) or `merged` (dFactory's stacked experts). A LoRA
    checkpoint needs `--merge-lora` (W + (alpha / r) B A: the official code has no adapters)."""
    import torch

    from training.adapters import has_adapters, merged_state_dict
    from training.hf_format import export_hf

    ckpt = _checkpoint_arg(cfg, args)
    if has_adapters(ckpt) != args.merge_lora:
        raise ConfigError(f"{ckpt} holds LoRA adapters: pass --merge-lora to fold them into the base weights (or "
                          "`convert lora-export` for the adapters alone)" if not args.merge_lora else
                          f"--merge-lora: {ckpt} holds no LoRA adapters (trained with model.lora.rank=0)")
    out = export_hf(merged_state_dict(ckpt), cfg.model, args.out, dtype=getattr(torch, args.dtype), layout=args.layout)
    print(f"exported {ckpt} -> {out} ({args.layout} layout{', LoRA merged' if args.merge_lora else ''})")
    return 0


def cmd_lora_export(cfg, args) -> int:
    """The adapters alone of a LoRA checkpoint (small): load them over the base HF dir with
    train.init_from=BASE model.lora.init_from=OUT."""
    from training.adapters import export_adapters

    ckpt = _checkpoint_arg(cfg, args)
    out = export_adapters(ckpt, args.out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"exported the LoRA adapters of {ckpt} -> {out} ({size / 2**20:.1f} MiB)")
    return 0


def cmd_train(cfg, args) -> int:
    from training.trainer import train

    train(cfg)
    _ignore_late_signals()
    return 0


def _ignore_late_signals() -> None:
    """Stopped (signal or done) with the checkpoint saved: a SLURM USR1/TERM still in flight to this rank (it may
    learn of the stop from a peer first) must not kill it while Python finalizes (the handlers revert to the
    default then), or the batch script sees a failed rank and does not requeue."""
    import signal

    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def cmd_distill_backbone(cfg, args) -> int:
    from training.backbone_distill.stage import distill_backbone

    distill_backbone(cfg)
    _ignore_late_signals()
    return 0


def cmd_train_decoder(cfg, args) -> int:
    from training.config import save_config
    from training.decoder.train import train_decoder

    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank: the process group starts inside the stage
        save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    train_decoder(cfg)
    return 0


def cmd_distill(cfg, args) -> int:
    from training.config import save_config
    from training.decoder.train import distill

    save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    distill(cfg)
    return 0


def cmd_make_sample(cfg, args) -> int:
    """`unidiff data make-sample CONFIG [OUT]`: args.out (default data.raw_dir)."""
    from data_pipeline.sample import make_sample

    make_sample(getattr(args, "out", None) or cfg.data.raw_dir, cfg.data.sample)
    return 0


def cmd_fit_codebook(cfg, args) -> int:
    """`unidiff tokenizer fit-codebook CONFIG`: optional args.out (default data.image_tokenizer.path)."""
    from data_pipeline.image_tokenizer.fit_codebook import fit_codebook, single_thread_unless_set

    single_thread_unless_set()
    fit_codebook(cfg.data, getattr(args, "out", None))
    return 0


def cmd_tokenizer_train(cfg, args) -> int:
    """`unidiff tokenizer train CONFIG`: optional args.out (default data.image_tokenizer.path); any number of ranks
    (`launch local --command "tokenizer train"`)."""
    from data_pipeline.image_tokenizer.fit_codebook import single_thread_unless_set
    from training.config import save_config
    from training.tokenizer.train import train_tokenizer

    single_thread_unless_set()
    if int(os.environ.get("RANK", "0")) == 0:
        save_config(cfg, Path(cfg.run_dir) / "tokenizer" / "config.yaml")
    train_tokenizer(cfg, getattr(args, "out", None))
    return 0


def cmd_pretokenize(cfg, args) -> int:
    """`unidiff pretokenize CONFIG`: optional args.workers (default data.pretokenize_workers), args.shards A:B,
    args.merge."""
    from data_pipeline.pretokenize import merge_manifest, pretokenize

    if getattr(args, "merge", False):
        merge_manifest(cfg.data)
        return 0
    shards = tuple(map(int, args.shards.split(":"))) if getattr(args, "shards", None) else None
    pretokenize(cfg.data, getattr(args, "workers", None), shards=shards)
    return 0


def cmd_eval(cfg, args) -> int:
    """`unidiff eval CONFIG [key=value ...] [--tasks elbo,choice,...]`; exit code 1 if a task failed."""
    from evals.harness import evaluate, parse_tasks

    names = parse_tasks(getattr(args, "tasks", "") or None, cfg.eval.tasks)
    results = evaluate(cfg, names)
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_generate(cfg, args) -> int:
    """`unidiff generate CONFIG --task understand|t2i|edit --prompt TEXT [--image PATH] ...`: results under --out."""
    from training.inference.generate import generate_files, parse_grid

    print(generate_files(cfg, args.task, args.prompt, image=args.image, grid=parse_grid(args.grid),
                         checkpoint=args.checkpoint, out=args.out or None, samples=args.samples, seed=args.seed,
                         device=args.device, decoder=args.decoder))
    return 0
