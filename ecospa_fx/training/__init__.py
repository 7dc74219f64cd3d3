"""EcoSpa training: gradual coupled pruning during training, recovery fine-tuning, torch.distributed."""

from ecospa_fx.training.distributed import ddp_wrapper
from ecospa_fx.training.graph import CausalLMGraph, capture_trainable, causal_lm_loss, logits_of
from ecospa_fx.training.pruner import EcoSpaPruner, PruneEvent
from ecospa_fx.training.schedule import PruneSchedule
from ecospa_fx.training.state_slicing import SLICEABLE, UnsupportedOptimizer

__all__ = [
    "SLICEABLE",
    "CausalLMGraph",
    "EcoSpaPruner",
    "PruneEvent",
    "PruneSchedule",
    "UnsupportedOptimizer",
    "capture_trainable",
    "causal_lm_loss",
    "ddp_wrapper",
    "logits_of",
]
