"""Hugging Face ``Trainer`` integration: gradual coupled pruning as a ``TrainerCallback``.

    gm = CausalLMGraph.capture(hf_model, (input_ids,))          # the Trainer trains the captured graph
    trainer = Trainer(model=gm, args=TrainingArguments(..., remove_unused_columns=False),
                      train_dataset=..., callbacks=[EcoSpaCallback(PruneSchedule(100, 1000, 0.5, every=100))])

The pruner is built in ``on_train_begin`` from the Trainer's model and optimizer (the optimizer type is
checked there, before the first step), observes gradients in ``on_pre_optimizer_step`` (after clipping,
before the update) and prunes in ``on_step_end`` at ``state.global_step``. The Trainer keeps its model,
optimizer and LR scheduler objects: the graph, the param groups and the optimizer state change in place.
Single process only: under a multi-process Trainer the DDP wrapper the Trainer holds would go stale.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from transformers import TrainerCallback

from ecospa_fx.errors import InputError
from ecospa_fx.training.graph import CausalLMGraph, capture_trainable, example_inputs_of
from ecospa_fx.training.pruner import EcoSpaPruner
from ecospa_fx.training.schedule import PruneSchedule


class EcoSpaCallback(TrainerCallback):
    """Prunes the Trainer's captured model on ``schedule``; ``pruner_options`` go to ``EcoSpaPruner``."""

    def __init__(self, schedule: PruneSchedule, example_inputs: tuple | None = None, **pruner_options: Any):
        if not isinstance(schedule, PruneSchedule):
            raise InputError(f"schedule must be a PruneSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.example_inputs = example_inputs
        self.options = pruner_options
        self.pruner: EcoSpaPruner | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.world_size > 1:
            raise InputError("EcoSpaCallback runs single-process; for DDP use EcoSpaPruner(wrap=ddp_wrapper())")
        if model is None or optimizer is None:
            raise InputError("EcoSpaCallback needs the Trainer's model and optimizer")
        if not isinstance(model, (CausalLMGraph, fx.GraphModule)):
            raise InputError(
                f"the Trainer's model is a {type(model).__name__}: give the Trainer the captured graph, "
                "model=CausalLMGraph.capture(model, (input_ids,)), so the pruned module is the one it trains"
            )
        inputs = self.example_inputs or example_inputs_of(capture_trainable(model, ()))
        self.pruner = EcoSpaPruner(model, inputs, optimizer, self.schedule, **self.options)
        self.pruner.step_count = state.global_step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.pruner is not None:
            self.pruner.observe()

    def on_step_end(self, args, state, control, **kwargs):
        if self.pruner is not None and self.pruner.step(state.global_step):
            event = self.pruner.history[-1]
            state.log_history.append(
                {"step": event.step, "ecospa_sparsity": event.sparsity, "ecospa_params": event.params_after}
            )
