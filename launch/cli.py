"""`unidiff <command> CONFIG.yaml [dotted.key=value ...] [--flags]` — the one entry point.

Positional words after the command are read as: the config (the first word ending in .yaml/.yml), dotlist overrides
(words containing '='), and the command's own positionals (e.g. OUT for `data make-sample`). The config is loaded and
validated before the command does any work. Each command is a function `(cfg, args) -> int` imported lazily, so
`unidiff --help` and `model info` stay fast.
"""
from __future__ import annotations

import signal
import sys

# SIGTERM / SIGUSR1 (SLURM's pre-timeout signal) ask `unidiff train` to save and stop. The trainer's own handlers
# (training/trainer.py: _StopFlag) exist only once torch and the engine are imported, seconds after start; until
# then USR1's default action would kill the rank. So the train command installs a recorder here, before any import
# below pulls in torch, and the trainer takes over whatever it recorded (it reads the `received` list of the
# handler it replaces).
EARLY_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class EarlySignals:
    """A signal handler that only records: the signals go to the trainer when it starts."""

    def __init__(self):
        self.received: list[int] = []

    def __call__(self, signum, frame):
        self.received.append(signum)


def install_early_signal_handlers() -> None:
    """Idempotent (`python -m launch.cli` may import this file a second time as `launch.cli`): a recorder already in
    place keeps what it recorded."""
    if any(hasattr(signal.getsignal(s), "received") for s in EARLY_SIGNALS):
        return
    recorder = EarlySignals()
    try:
        for s in EARLY_SIGNALS:
            signal.signal(s, recorder)
    except ValueError:  # not the main thread (imported by a tool): the trainer installs its own
        pass


if sys.argv[1:2] == ["train"]:
    install_early_signal_handlers()

import argparse  # noqa: E402  (after the handlers, on purpose)
import importlib  # noqa: E402

from training.config import ConfigError  # noqa: E402  (imports torch)


def _flags_info(p):
    p.add_argument("--json", action="store_true", help="print JSON")


def _flags_import(p):
    p.add_argument("--src", required=True, help="HF checkpoint dir (config.json + safetensors)")
    p.add_argument("--out", required=True, help="model preset YAML to write")


def _flags_export(p):
    p.add_argument("--out", required=True, help="output dir for config.json + safetensors")
    p.add_argument("--checkpoint", default="", help="checkpoint dir (default: the run's latest valid one)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--layout", default="released", choices=["released", "merged"],
                   help="routed experts one key each (released HF checkpoints, model_type llada2_moe) or stacked "
                        "[E, ...] per layer (dFactory training layout, model_type llada2_moe_veomni)")


def _flags_out(p):
    p.add_argument("--out", default=None, help="output path (default: from the config)")


def _flags_pretokenize(p):
    p.add_argument("--workers", type=int, default=None, help="worker processes over shards")
    p.add_argument("--shards", default=None, help="A:B: only raw shards A..B-1 (train then val, sorted); no manifest")
    p.add_argument("--merge", action="store_true", help="check every shard is finished, then write manifest.json")


# name -> (target "module:function", flag adder or None, help)
COMMANDS: dict[str, tuple[str, object, str]] = {
    "model info": ("launch.commands:cmd_model_info", _flags_info, "parameter counts (meta device, no memory)"),
    "convert hf-import": ("launch.commands:cmd_hf_import", _flags_import,
                          "check an HF checkpoint and write a model preset for it (train with train.init_from=DIR)"),
    "convert hf-export": ("launch.commands:cmd_hf_export", _flags_export, "export a checkpoint to HF format"),
    "train": ("launch.commands:cmd_train", None, "train the backbone (in this process; see `launch local`)"),
    "data make-sample": ("data_pipeline.sample:cmd_make_sample", _flags_out,
                         "write the bundled raw sample shards (real photos from wheels + procedural shapes) to OUT"),
    "tokenizer fit-codebook": ("data_pipeline.image_tokenizer.fit_codebook:cmd_fit_codebook", _flags_out,
                               "fit the SigLIP-VQ codebook by spherical k-means on ViT features"),
    "pretokenize": ("data_pipeline.pretokenize:cmd_pretokenize", _flags_pretokenize,
                    "raw shards -> token shards in the official layout + manifest.json (resumable)"),
    "eval": ("evals.harness:cmd_eval", importlib.import_module("evals.harness").add_eval_flags,
             "evaluate a run: likelihood, understanding, generation, reconstruction, speed"),
    "generate": ("training.diffusion.generate:cmd_generate",
                 importlib.import_module("training.diffusion.generate").add_generate_args,
                 "understanding (image + question -> text), text-to-image, editing from a checkpoint"),
    "train-decoder": ("training.decoder.train:cmd_train_decoder", None,
                      "train the diffusion decoder (image tokens -> pixels, rectified flow)"),
    "distill": ("training.decoder.train:cmd_distill", None, "distill the decoder to a few-step student"),
    "quickstart": ("launch.quickstart:cmd_quickstart", None, "the whole pipeline on the bundled default"),
    "plan": ("launch.plan:cmd_plan", importlib.import_module("launch.plan").add_flags,
             "rehearse one rank of an N-GPU job on this CPU: memory, FLOPs, collectives, device hygiene"),
    "launch local": ("launch.local:cmd_launch_local", importlib.import_module("launch.local").add_flags,
                     "torchrun on this machine: --nproc N ranks of `unidiff train`"),
    "launch slurm": ("launch.slurm:cmd_launch_slurm", importlib.import_module("launch.slurm").add_flags,
                     "render + sbatch a multi-node job (srun per rank, pre-timeout save, requeue, auto-resume)"),
}


def _split(words: list[str]):
    config, overrides, rest = None, [], []
    for w in words:
        if config is None and w.endswith((".yaml", ".yml")):
            config = w
        elif "=" in w and not w.startswith("-"):
            overrides.append(w)
        else:
            rest.append(w)
    return config, overrides, rest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unidiff", description="Pretrain, distill and evaluate unified "
                                     "discrete-diffusion multimodal MoE models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (target, add_flags, help_text) in COMMANDS.items():
        words = name.split()
        if len(words) == 1:
            p = sub.add_parser(words[0], help=help_text)
        else:
            if words[0] not in groups:
                g = sub.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            p = groups[words[0]].add_parser(words[1], help=help_text)
        p.set_defaults(target=target)
        p.add_argument("words", nargs="*", help="CONFIG.yaml, dotted.key=value overrides, and positionals")
        if add_flags:
            add_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    stray = [w for w in unknown if "=" not in w or w.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:  # overrides written after the flags
        args.words = [*getattr(args, "words", []), *unknown]
    if not getattr(args, "target", None):
        parser.print_help()
        return 2
    if args.target == COMMANDS["train"][0]:  # main(["train", ...]) from Python: as early as it can be here
        install_early_signal_handlers()
    config, overrides, args.positionals = _split(args.words)
    args.config, args.overrides = config, overrides
    if getattr(args, "out", "") is None and args.positionals:  # `data make-sample OUT` style
        args.out = args.positionals.pop(0)
    from training.config import load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"unidiff: config error: {e}", file=sys.stderr)
        return 2
    module, fn = args.target.split(":")
    try:
        return int(getattr(importlib.import_module(module), fn)(cfg, args) or 0)
    except ConfigError as e:
        print(f"unidiff: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
