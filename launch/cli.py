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


if sys.argv[1:2] in (["train"], ["distill-backbone"]):
    install_early_signal_handlers()

import argparse  # noqa: E402  (after the handlers, on purpose)
import importlib  # noqa: E402

from launch.registry import COMMANDS  # noqa: E402
from training.config import load_config  # noqa: E402  (imports torch)
from training.config_errors import ConfigError  # noqa: E402


def _split(words: list[str]):
    config, overrides, rest = None, [], []
    for w in words:
        if w.endswith((".yaml", ".yml")) and "=" not in w:
            if config is not None:  # load_config reads one file: a second one would be dropped without a word
                raise ValueError(f"a second config file {w!r} after {config!r}: unidiff reads one CONFIG.yaml; "
                                 f"compose presets with `defaults: [other.yaml, ...]` inside it")
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
        if isinstance(add_flags, str):  # "module:function" in the command's own module
            module, fn = add_flags.split(":")
            add_flags = getattr(importlib.import_module(module), fn)
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
    if args.target in (COMMANDS["train"][0], COMMANDS["distill-backbone"][0]):  # the trainer's stages; from
        # main([...]) in Python: as early as it can be here
        install_early_signal_handlers()
    try:
        config, overrides, args.positionals = _split(args.words)
    except ValueError as e:
        parser.error(str(e))
    args.config, args.overrides = config, overrides
    takes_out = getattr(args, "out", "") is None  # `data make-sample OUT` style
    if takes_out and args.positionals:
        args.out = args.positionals.pop(0)
    if args.positionals:
        parser.error(f"unexpected word {args.positionals[0]!r}: after the command come CONFIG.yaml, dotted.key=value "
                     f"overrides{' and OUT' if takes_out else ''} and the command's --flags")
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
