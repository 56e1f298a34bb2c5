"""LoRA adapter files: the small artifact of a `model.lora` run, and the merge into the base weights.

    <dir>/adapter_config.json        {"format": "unidiff-lora-v1", "rank", "alpha", "targets"}
    <dir>/adapter_model.safetensors  the adapters only, full (unsharded) tensors in the model's own names
                                     (`...query_key_value.lora_A`, `...mlp.experts.gate_proj_lora_B`, ...)

`unidiff convert lora-export` writes it from a checkpoint of any engine / layout; a run loads it over the base HF dir
with `train.init_from=BASE model.lora.init_from=DIR` (streamed like an HF import: each rank reads its shard).
`unidiff convert hf-export --merge-lora` folds W + (alpha / r) B A into the base weights instead, for the official
code. The trainer's own checkpoints stay whole (base included) so resume, eval and export need nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from training.config_errors import ConfigError
from training.engines.shard_format import ShardReader
from training.model.lora import is_adapter, merge

FORMAT = "unidiff-lora-v1"
CONFIG = "adapter_config.json"


def _lora_of(reader: ShardReader) -> dict:
    """The checkpoint's own LoRA settings (meta.json's model config), which its adapters were trained with."""
    lora = reader.meta.get("model_config", {}).get("lora") or {}
    if not lora.get("rank") or not any(is_adapter(n) for n in reader.names()):
        raise ConfigError(f"checkpoint {reader.dir} has no LoRA adapters (trained with model.lora.rank=0)")
    return lora


def export_adapters(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    reader = ShardReader(Path(ckpt_dir))
    lora = _lora_of(reader)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: reader.read_full(n).contiguous() for n in reader.names() if is_adapter(n)}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps({"format": FORMAT, "rank": lora["rank"], "alpha": lora["alpha"],
                                          "targets": list(lora["targets"])}, indent=2) + "\n")
    return out


def check_adapter_dir(path: str | Path, lcfg) -> None:
    """An adapter dir must have been trained with the run's rank, alpha and targets: name what differs."""
    p = Path(path) / CONFIG
    saved = json.loads(p.read_text())
    if saved.get("format") != FORMAT:
        raise ConfigError(f"{p}: format {saved.get('format')!r}, expected {FORMAT!r}")
    ours = {"rank": lcfg.rank, "alpha": lcfg.alpha, "targets": list(lcfg.targets)}
    diff = [f"model.lora.{k}={ours[k]} but the adapters have {saved.get(k)}" for k in ours if saved.get(k) != ours[k]]
    if diff:
        raise ConfigError(f"model.lora.init_from={path}: " + "; ".join(diff) + " (set them to match)")


def has_adapters(ckpt_dir: str | Path) -> bool:
    return any(is_adapter(n) for n in ShardReader(Path(ckpt_dir)).names())


def merged_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's full weights (no optimizer state) as the plain model's state dict: a LoRA checkpoint's
    W + (alpha / r) B A folded in, any other as saved."""
    reader = ShardReader(Path(ckpt_dir))
    state = dict(reader.iter_full())
    if not any(is_adapter(n) for n in state):
        return state
    lora = _lora_of(reader)
    return merge(state, lora["alpha"] / lora["rank"])
