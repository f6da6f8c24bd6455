"""dsmoe: DeepSeek-style Mixture-of-Experts in PyTorch."""

from dsmoe.config import BiasRule, GroupScore, MoEConfig, ScoreFunc
from dsmoe.experts import GroupedExperts, SwiGLU, reference_experts
from dsmoe.moe import MoE, moe_layers, update_biases
from dsmoe.router import Router, route

__all__ = [
    "BiasRule", "GroupScore", "GroupedExperts", "MoE", "MoEConfig", "Router", "ScoreFunc", "SwiGLU",
    "moe_layers", "reference_experts", "route", "update_biases",
]
__version__ = "0.1.0"
