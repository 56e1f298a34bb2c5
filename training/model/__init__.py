"""The LLaDA2.0(-Uni) MoE backbone: one definition, used by every engine."""
from training.model.llada2 import LLaDA2MoE, ModelOutput, build_model, count_params
from training.model.moe import RouterStats

__all__ = ["LLaDA2MoE", "ModelOutput", "RouterStats", "build_model", "count_params"]
