"""dsmoe: DeepSeek-style Mixture-of-Experts in PyTorch.

The layer (`MoE`, `MoEConfig`, `Router`/`route`, `GroupedExperts`), the language model (`MoETransformer`,
`ModelConfig`), run configuration (`TrainConfig`, `PRESETS`, `build_configs`), checkpoints, the HuggingFace
DeepSeek-V2/V3 converters and whole checkpoints (`from_pretrained`, `save_pretrained`). Training and
evaluation are `dsmoe.train.train` and `dsmoe.evaluate.evaluate` (modules of the same name: not re-exported
here, where the functions would hide them). The command line is `dsmoe.cli` (the `dsmoe` command).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsmoe.checkpoint import load_checkpoint
    from dsmoe.config import (
        AuxLossScores,
        BiasRule,
        GroupScore,
        ModelConfig,
        MoEConfig,
        ScoreFunc,
        SeqAuxExperts,
        TrainConfig,
    )
    from dsmoe.experts import GroupedExperts, SwiGLU, reference_experts
    from dsmoe.hf import hf_state_dict, load_hf_state_dict, moe_config_from_hf, moe_config_to_hf
    from dsmoe.model import MoETransformer
    from dsmoe.moe import MoE, moe_layers, update_biases
    from dsmoe.presets import PRESETS, build_configs
    from dsmoe.pretrained import from_pretrained, save_pretrained
    from dsmoe.router import Router, route

# name -> its module; imported on first use, so `import dsmoe.prepare` (the tokenizing workers) needs no torch
_EXPORTS = {
    "load_checkpoint": "checkpoint", "AuxLossScores": "config", "BiasRule": "config", "GroupScore": "config",
    "ModelConfig": "config", "MoEConfig": "config", "ScoreFunc": "config", "SeqAuxExperts": "config",
    "TrainConfig": "config", "GroupedExperts": "experts", "SwiGLU": "experts", "reference_experts": "experts",
    "hf_state_dict": "hf", "load_hf_state_dict": "hf", "moe_config_from_hf": "hf", "moe_config_to_hf": "hf",
    "MoETransformer": "model", "MoE": "moe", "moe_layers": "moe", "update_biases": "moe", "PRESETS": "presets",
    "build_configs": "presets", "from_pretrained": "pretrained", "save_pretrained": "pretrained",
    "Router": "router", "route": "router",
}


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsmoe' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dsmoe.{_EXPORTS[name]}"), name)


# listed for the tools that read it statically; tests/test_cli.py holds it equal to _EXPORTS
__all__ = [
    "PRESETS", "AuxLossScores", "BiasRule", "GroupScore", "GroupedExperts", "ModelConfig", "MoE", "MoEConfig",
    "MoETransformer", "Router", "ScoreFunc", "SeqAuxExperts", "SwiGLU", "TrainConfig", "build_configs",
    "from_pretrained", "hf_state_dict", "load_checkpoint", "load_hf_state_dict", "moe_config_from_hf",
    "moe_config_to_hf", "moe_layers", "reference_experts", "route", "save_pretrained", "update_biases",
]
__version__ = "0.1.0"
