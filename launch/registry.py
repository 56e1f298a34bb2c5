"""The table of `unidiff` commands: name -> (target "module:function", its flags, help line).

A command's flags are a function adding them to its argparse parser: defined here for the commands whose module has
none, else named "module:function" in the command's own module and loaded when the CLI builds its parser. So this
table imports no command module, and commands that take another command's name (`launch local|slurm --command`)
check it here without importing the CLI back.
"""
from __future__ import annotations

from typing import Callable

from training.config_errors import ConfigError


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
    p.add_argument("--merge-lora", action="store_true",
                   help="a LoRA checkpoint: fold W + (alpha / r) B A into the base weights (no adapters in the export)")


def _flags_lora_export(p):
    p.add_argument("--out", required=True, help="output dir for adapter_config.json + adapter_model.safetensors")
    p.add_argument("--checkpoint", default="", help="checkpoint dir (default: the run's latest valid one)")


def _flags_out(p):
    p.add_argument("--out", default=None, help="output path (default: from the config)")


def _flags_pretokenize(p):
    p.add_argument("--workers", type=int, default=None, help="worker processes over shards")
    p.add_argument("--shards", default=None, help="A:B: only raw shards A..B-1 (train then val, sorted); no manifest")
    p.add_argument("--merge", action="store_true", help="check every shard is finished, then write manifest.json")


def _flags_eval(p):
    p.add_argument("--tasks", default="", help="comma list of eval tasks (default: eval.tasks from the config)")


def _flags_generate(p):
    """Sampler knobs are config keys (diffusion.sample_*, cfg_*), not flags."""
    p.add_argument("--task", choices=["understand", "t2i", "edit"], required=True)
    p.add_argument("--prompt", required=True, help="question (understand), caption (t2i) or instruction (edit)")
    p.add_argument("--image", default="", help="input image path (understand, edit)")
    p.add_argument("--grid", default="8x8", help="t2i output grid HxW in image tokens")
    p.add_argument("--checkpoint", default="", help="checkpoint step dir or HF-format dir (default: latest in run)")
    p.add_argument("--decoder", default="", help="decoder checkpoint dir: also write the images as PNG (t2i, edit)")
    p.add_argument("--out", default="", help="output dir (default: <run dir>/generate)")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda if available)")


Flags = Callable | str | None

COMMANDS: dict[str, tuple[str, Flags, str]] = {
    "model info": ("launch.commands:cmd_model_info", _flags_info, "parameter counts (meta device, no memory)"),
    "convert hf-import": ("launch.commands:cmd_hf_import", _flags_import,
                          "check an HF checkpoint and write a model preset for it (train with train.init_from=DIR)"),
    "convert hf-export": ("launch.commands:cmd_hf_export", _flags_export, "export a checkpoint to HF format"),
    "convert lora-export": ("launch.commands:cmd_lora_export", _flags_lora_export,
                            "the LoRA adapters alone of a checkpoint (load over a base: model.lora.init_from=DIR)"),
    "train": ("launch.commands:cmd_train", None, "train the backbone (in this process; see `launch local`)"),
    "data make-sample": ("launch.commands:cmd_make_sample", _flags_out,
                         "write the bundled raw sample shards (real photos from wheels + procedural shapes) to OUT"),
    "tokenizer fit-codebook": ("launch.commands:cmd_fit_codebook", _flags_out,
                               "fit the SigLIP-VQ codebook by spherical k-means on ViT features"),
    "tokenizer train": ("launch.commands:cmd_tokenizer_train", _flags_out,
                        "train the SigLIP-VQ tokenizer: ViT + text tower (sigmoid loss), then the codebook (VQ)"),
    "pretokenize": ("launch.commands:cmd_pretokenize", _flags_pretokenize,
                    "raw shards -> token shards in the official layout + manifest.json (resumable)"),
    "eval": ("launch.commands:cmd_eval", _flags_eval,
             "evaluate a run: likelihood, understanding, generation, reconstruction, speed"),
    "generate": ("launch.commands:cmd_generate", _flags_generate,
                 "understanding (image + question -> text), text-to-image, editing from a checkpoint"),
    "train-decoder": ("launch.commands:cmd_train_decoder", None,
                      "train the diffusion decoder (image tokens -> pixels, rectified flow)"),
    "distill": ("launch.commands:cmd_distill", None, "distill the decoder to a few-step student"),
    "distill-backbone": ("launch.commands:cmd_distill_backbone", None,
                         "parallel-decoding distillation of the backbone (distill_backbone.method: path | dparallel)"),
    "quickstart": ("launch.quickstart:cmd_quickstart", None, "the whole pipeline on the bundled default"),
    "plan": ("launch.plan:cmd_plan", "launch.plan:add_flags",
             "rehearse one rank of an N-GPU job on this CPU: memory, FLOPs, collectives, device hygiene"),
    "launch local": ("launch.local:cmd_launch_local", "launch.local:add_flags",
                     "torchrun on this machine: --nproc N ranks of `unidiff train`"),
    "launch slurm": ("launch.slurm:cmd_launch_slurm", "launch.slurm:add_flags",
                     "render + sbatch a multi-node job (srun per rank, pre-timeout save, requeue, auto-resume)"),
}


def check_command(command: str) -> None:
    """`--command WORDS` of the launchers: a unidiff command, named as on the command line."""
    if command not in COMMANDS:
        raise ConfigError(f"--command {command} is not a unidiff command; allowed: {', '.join(sorted(COMMANDS))}")
