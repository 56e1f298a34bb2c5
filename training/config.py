"""The one typed config schema (omegaconf structured configs).

YAML presets in `configs/` merge over these dataclasses, then `key=value` dotlist overrides from the command line.
Every section owns its own dataclass next to the code that reads it; this module composes them and validates
the cross-section constraints before any work starts.

Field names of `ModelConfig` follow the official LLaDA2.0(-Uni) `config.json`, so `hf_format` maps them 1:1.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from data_pipeline.config import DataConfig
from evals.config import EvalConfig
from launch.config import LaunchConfig
from training.backbone_distill.config import DistillBackboneConfig
from training.config_errors import ConfigError, check as _check
from training.decoder.config import DecoderConfig, DistillConfig
from training.diffusion.config import DiffusionConfig
from training.tokenizer.config import TokenizerTrainConfig


LORA_TARGETS = ("attention_qkv", "attention_out", "dense_mlp", "shared_expert", "routed_experts")


@dataclass
class LoraConfig:
    """LoRA fine-tuning (training/engines/lora.py): the base weights frozen, rank-r adapters trained."""
    rank: int = 0  # 0: off (full fine-tuning); r > 0: every targeted weight W becomes W + (alpha / r) B A
    alpha: float = 32.0  # the update's scale numerator (alpha / rank)
    # which weights get adapters: attention_qkv (query_key_value), attention_out (attention.dense), dense_mlp
    # (gate/up/down of the first_k_dense_replace layers), shared_expert, routed_experts (one adapter per expert)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    init_from: str = ""  # adapter dir (`unidiff convert lora-export`) loaded over train.init_from's base weights

    def validate(self, root: "Config") -> None:
        _check(self.rank >= 0, "model.lora.rank", self.rank, ">= 0 (0 = off)")
        _check(self.alpha > 0, "model.lora.alpha", self.alpha, "> 0")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        _check(not bad and bool(self.targets), "model.lora.targets", self.targets,
               f"a non-empty list of {' | '.join(LORA_TARGETS)}")
        if self.rank and "routed_experts" in self.targets:
            _check(root.parallel.expert_tensor == 1, "parallel.expert_tensor", root.parallel.expert_tensor,
                   "1 with model.lora.targets holding routed_experts (expert adapters follow EP only)")
        _check(not self.init_from or (self.rank > 0 and (Path(self.init_from) / "adapter_config.json").exists()),
               "model.lora.init_from", self.init_from,
               "empty, or with model.lora.rank > 0 an adapter dir holding adapter_config.json")
        _check(not self.init_from or bool(root.train.init_from), "model.lora.init_from", self.init_from,
               "used with train.init_from (the base weights the adapters load over)")


@dataclass
class ModelConfig:
    vocab_size: int = 173568  # text vocab + image codebook (Uni: 157184 + 16384)
    hidden_size: int = 2048
    intermediate_size: int = 5120  # width of the dense MLP in the first_k_dense_replace layers
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4  # GQA
    head_dim: int = 128
    first_k_dense_replace: int = 1  # layers [0, k) use a dense MLP, the rest MoE
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 512
    n_group: int = 8  # expert groups for group-limited routing
    topk_group: int = 4  # groups kept per token
    routed_scaling_factor: float = 2.5
    rms_norm_eps: float = 1e-6
    rope_theta: float = 600000.0
    partial_rotary_factor: float = 0.5  # rotary on the first head_dim * factor dims of each head
    max_position_embeddings: int = 8192
    image_token_offset: int = 157184  # LLM id = VQ id + offset
    use_qkv_bias: bool = False
    use_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int = 156892
    # Load balancing (off by default, like the release): aux-loss-free bias update rate,
    # sequence-level auxiliary loss and router z-loss coefficients.
    expert_bias_update_rate: float = 0.0
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    attention: str = "auto"  # auto (flex on CUDA, tiled SDPA on CPU) | flex | sdpa (the dense mask)
    grouped_gemm: str = "auto"  # auto | on | off: torch._grouped_mm for the experts where it runs
    # Recompute in the backward instead of keeping activations: none | full (every decoder layer: only the layer
    # inputs are kept) | selective (attention and the expert MLPs; the router and the all-to-all dispatch are kept)
    activation_checkpointing: str = "none"
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, root: "Config") -> None:
        self.lora.validate(root)
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "model.num_attention_heads",
               self.num_attention_heads, f"a multiple of model.num_key_value_heads={self.num_key_value_heads}")
        _check(self.num_experts % self.n_group == 0, "model.num_experts", self.num_experts,
               f"divisible by model.n_group={self.n_group}")
        _check(1 <= self.topk_group <= self.n_group, "model.topk_group", self.topk_group,
               f"between 1 and model.n_group={self.n_group}")
        per_group = self.num_experts // max(self.n_group, 1)
        _check(self.num_experts_per_tok <= self.topk_group * per_group, "model.num_experts_per_tok",
               self.num_experts_per_tok, f"at most topk_group * experts per group = {self.topk_group * per_group}")
        if self.n_group > 1:
            _check(per_group >= 2, "model.n_group", self.n_group,
                   "small enough that each group holds >= 2 experts (group score = sum of its top-2)")
        _check(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "model.first_k_dense_replace",
               self.first_k_dense_replace, f"between 0 and model.num_hidden_layers={self.num_hidden_layers}")
        rot = int(self.head_dim * self.partial_rotary_factor)
        _check(rot % 2 == 0 and 0 < rot <= self.head_dim, "model.partial_rotary_factor", self.partial_rotary_factor,
               f"such that head_dim * factor is an even number in (0, head_dim={self.head_dim}]")
        _check(self.attention in ("auto", "flex", "sdpa"), "model.attention", self.attention, "auto | flex | sdpa")
        _check(self.grouped_gemm in ("auto", "on", "off"), "model.grouped_gemm", self.grouped_gemm, "auto | on | off")
        _check(self.activation_checkpointing in ("none", "full", "selective"), "model.activation_checkpointing",
               self.activation_checkpointing, "none | full | selective")
        _check(0 < self.image_token_offset <= self.vocab_size, "model.image_token_offset", self.image_token_offset,
               f"in (0, model.vocab_size={self.vocab_size}]")


@dataclass
class ParallelConfig:
    tensor: int = 1  # TP: attention heads and dense MLP split over this many ranks
    expert: int = 1  # EP: routed experts split over this many ranks
    expert_tensor: int = 1  # ETP: each expert's MLP split over this many ranks
    pipeline: int = 1
    sequence_parallel: bool = False  # with TP > 1: norms/dropout on sequence shards
    zero_stage: int = 2  # deepspeed only

    def validate(self, root: "Config") -> None:
        m = root.model
        for key in ("tensor", "expert", "expert_tensor", "pipeline"):
            _check(getattr(self, key) >= 1, f"parallel.{key}", getattr(self, key), ">= 1")
        _check(m.num_attention_heads % self.tensor == 0, "model.num_attention_heads", m.num_attention_heads,
               f"divisible by parallel.tensor={self.tensor}")
        _check(m.num_key_value_heads % self.tensor == 0, "model.num_key_value_heads", m.num_key_value_heads,
               f"divisible by parallel.tensor={self.tensor}")
        if not m.tie_word_embeddings:  # the LM head is split by vocab rows under TP (engines/vocab_parallel.py)
            _check(m.vocab_size % self.tensor == 0, "model.vocab_size", m.vocab_size,
                   f"divisible by parallel.tensor={self.tensor} (pad the vocabulary)")
        _check(m.num_experts % self.expert == 0, "model.num_experts", m.num_experts,
               f"divisible by parallel.expert={self.expert}")
        _check(m.moe_intermediate_size % self.expert_tensor == 0, "model.moe_intermediate_size",
               m.moe_intermediate_size, f"divisible by parallel.expert_tensor={self.expert_tensor}")
        _check(m.num_hidden_layers % self.pipeline == 0, "model.num_hidden_layers", m.num_hidden_layers,
               f"divisible by parallel.pipeline={self.pipeline}")
        _check(self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", self.zero_stage, "0 | 1 | 2 | 3")

    def data_parallel(self, world_size: int) -> int:
        """DP size for a world; raises if the layout does not tile it."""
        model_par = self.tensor * self.pipeline
        if world_size % model_par:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline "
                              f"= {model_par}")
        dp = world_size // model_par
        expert_par = self.expert * self.expert_tensor
        if (dp * self.tensor) % expert_par:
            raise ConfigError(f"world size {world_size}: data x tensor = {dp * self.tensor} ranks per pipeline stage "
                              f"is not divisible by parallel.expert x parallel.expert_tensor = {expert_par}")
        return dp


@dataclass
class TrainConfig:
    engine: str = "native"  # native (torch DDP/EP on gloo or nccl) | megatron | deepspeed
    steps: int = 100
    seq_len: int = 256  # tokens per packed sequence (the x_t half; block diffusion doubles it inside the model)
    micro_batch_size: int = 2  # sequences per rank per forward
    global_batch_size: int = 4  # sequences per optimizer step over all data-parallel ranks
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10  # warmup-stable-decay: linear warmup ...
    decay_steps: int = 20  # ... and linear decay to min_lr over the last decay_steps
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    # bf16: bf16 params and activations, fp32 master weights in the optimizer, fp32 gradient accumulation (router
    # scores and expert_bias in fp32) | fp32: fp32 params, no autocast
    precision: str = "bf16"
    # gradient all-reduce / reduce-scatter overlapped with the backward (megatron DDP overlap_grad_reduce, DeepSpeed
    # ZeRO-2 overlap_comm; native: never): auto = on when the device is CUDA | true | false
    overlap_grad_reduce: str = "auto"
    seed: int = 1234
    save_every: int = 50  # steps between periodic checkpoints (0: only at the end and on signals)
    keep_last: int = 3
    resume: str = "auto"  # auto: latest valid checkpoint in the run dir | none | a checkpoint path
    init_from: str = ""  # HF checkpoint dir (config.json + safetensors) to start from when there is nothing to resume
    max_consecutive_nonfinite: int = 5  # NaN/inf steps are skipped; stop after this many in a row
    # seconds a rank waits in a collective (every process group's timeout) before it fails instead of hanging on a
    # peer that is stuck; torch's default is 30 min. Raise it if one rank may work alone longer (a slow filesystem)
    collective_timeout_s: int = 600
    log_every: int = 1
    peak_flops: float = 989e12  # per device, for the MFU estimate (H100 SXM bf16 dense)
    stop_after: int = 0  # testing aid: exit cleanly (saving) after this many steps of this run; 0 = off

    def validate(self, root: "Config") -> None:
        _check(self.engine in ("native", "megatron", "deepspeed"), "train.engine", self.engine,
               "native | megatron | deepspeed")
        _check(self.precision in ("bf16", "fp32"), "train.precision", self.precision, "bf16 | fp32")
        _check(str(self.overlap_grad_reduce).lower() in ("auto", "true", "false"), "train.overlap_grad_reduce",
               self.overlap_grad_reduce, "auto | true | false")
        _check(self.steps >= 1, "train.steps", self.steps, ">= 1")
        _check(self.micro_batch_size >= 1, "train.micro_batch_size", self.micro_batch_size, ">= 1")
        _check(self.collective_timeout_s >= 1, "train.collective_timeout_s", self.collective_timeout_s, ">= 1")
        _check(self.global_batch_size % self.micro_batch_size == 0, "train.global_batch_size",
               self.global_batch_size, f"a multiple of train.micro_batch_size={self.micro_batch_size}")
        _check(self.resume in ("auto", "none") or Path(self.resume).exists(), "train.resume", self.resume,
               "auto | none | an existing checkpoint directory")
        _check(not self.init_from or (Path(self.init_from) / "config.json").exists(), "train.init_from",
               self.init_from, "empty or an HF checkpoint dir holding config.json")
        _check(self.seq_len <= root.model.max_position_embeddings, "train.seq_len", self.seq_len,
               f"<= model.max_position_embeddings={root.model.max_position_embeddings}")


@dataclass
class TrackingConfig:
    wandb: str = "offline"  # offline (default: no server, no key) | online | disabled
    project: str = "unidiff"
    entity: str = ""
    run_id: str = ""  # filled in at the first start and kept in the run dir so a resumed run continues it

    def validate(self, root: "Config") -> None:
        _check(self.wandb in ("offline", "online", "disabled"), "tracking.wandb", self.wandb,
               "offline | online | disabled")


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs"  # run dirs are <dir>/<name>/

    def validate(self, root: "Config") -> None:
        _check(bool(self.name) and "/" not in self.name, "run.name", self.name, "a non-empty name without '/'")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer_train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    distill_backbone: DistillBackboneConfig = field(default_factory=DistillBackboneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


def validate(cfg: Config) -> Config:
    """Run every section's checks; the first failure raises ConfigError naming key, value and what is allowed."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if hasattr(section, "validate"):
            section.validate(cfg)
    return cfg


def _merge(base, other, source: str):
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or e.key
        parent = str(key).rsplit(".", 1)[0] if "." in str(key) else ""
        node = OmegaConf.select(base, parent) if parent else base
        allowed = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "?"
        raise ConfigError(f"unknown key '{key}' in {source}; allowed keys here: {allowed}") from None
    except ValidationError as e:
        raise ConfigError(f"{e.full_key}: {e.msg.splitlines()[0]} (in {source})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- YAML preset (with `defaults:` includes) <- dotlist overrides, then validate."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path)), str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form dotted.key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command-line overrides")
    return validate(OmegaConf.to_object(cfg))


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()):
    """A preset may list `defaults: [relative/other.yaml, ...]`, merged first (in order), so presets compose.
    `chain` is the include path down to here: a file that includes itself, directly or not, is an error."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"circular `defaults:` include: {' -> '.join(str(p) for p in (*chain, path))}")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist" + (f" (included by {chain[-1]})" if chain else ""))
    node = OmegaConf.load(path)
    includes = node.pop("defaults", []) if "defaults" in node else []
    merged = OmegaConf.create()
    for inc in includes:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(inc), (*chain, path)))
    return OmegaConf.merge(merged, node)


def redacted(cfg: Config) -> Config:
    """cfg as it may be written or logged: secret-looking launch.env values (launch/config.py: is_secret) replaced."""
    return dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, env=cfg.launch.public_env()))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(redacted(cfg)))


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config, saved in every run dir (secrets redacted)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def to_dict(cfg: Any) -> dict:
    """A JSON-able copy for trackers (secrets redacted)."""
    cfg = redacted(cfg) if isinstance(cfg, Config) else cfg
    return json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg)), default=str))
