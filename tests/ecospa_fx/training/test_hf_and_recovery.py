"""The Hugging Face Trainer callback, and recovery fine-tuning with distillation and checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import ecospa_fx
from ecospa_fx.errors import InputError
from ecospa_fx.training import CausalLMGraph, PruneSchedule, logits_of
from ecospa_fx.training.hf_callback import EcoSpaCallback
from ecospa_fx.training.recovery import RecoveryConfig, distillation_loss, load_checkpoint, recover

from .tiny import batches, tiny_llama


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_trainer_callback_prunes_in_place(tmp_path):
    data = torch.cat(batches(8))
    model = CausalLMGraph.capture(tiny_llama(), (data[:2],))
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
    )
    callback = EcoSpaCallback(PruneSchedule(1, 4, 0.5, every=1), round_to=2)
    trainer = tf.Trainer(model=model, args=args, train_dataset=_Rows(data), callbacks=[callback])
    trainer.train()
    assert [e.step for e in callback.pruner.history] == [2, 3, 4]
    assert model.graph_module.get_parameter("model.layers.0.mlp.up_proj.weight").shape == (32, 32)
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.parameters()}
    assert any("ecospa_sparsity" in row for row in trainer.state.log_history)


def test_trainer_callback_refuses_an_uncaptured_model(tmp_path):
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    callback = EcoSpaCallback(PruneSchedule(0, 2, 0.5))
    with pytest.raises(InputError, match="captured graph"):
        callback.on_train_begin(args, None, None, model=tiny_llama(), optimizer=torch.optim.AdamW([torch.zeros(1)]))


def test_distillation_loss_is_cross_entropy_plus_scaled_kl():
    torch.manual_seed(0)
    s, t, ids = torch.randn(2, 5, 7), torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    assert torch.allclose(distillation_loss(s, t, ids, 0.0, 2.0), distillation_loss(s, None, ids, 0.5, 2.0))
    same = distillation_loss(s, s, ids, 1.0, 2.0)
    assert same.abs() < 1e-6  # KL of a distribution with itself
    assert distillation_loss(s, t, ids, 1.0, 2.0) > 0


def test_recovery_with_distillation_checkpoints_and_resumes(tmp_path):
    dense, data = tiny_llama(), batches(6)
    compressed = ecospa_fx.compress(dense, (data[0],), sparsity=0.5, round_to=2)
    config = RecoveryConfig(
        steps=4, lr=3e-3, distill=0.5, temperature=2.0, checkpoint_dir=str(tmp_path), checkpoint_every=2
    )
    result = recover(compressed, [(x,) for x in data], config, teacher=dense)
    assert [p.name for p in result.checkpoints] == ["step-2", "step-4"]
    assert result.losses[-1] < result.losses[0]
    module, opt, step = load_checkpoint(tmp_path / "step-4")
    assert step == 4
    with torch.no_grad():
        assert torch.allclose(logits_of(module(data[1])), logits_of(compressed(data[1])), atol=1e-5)
    more = RecoveryConfig(steps=1, lr=3e-3, checkpoint_dir=str(tmp_path))
    recover(module, [(data[4],)], more, optimizer=opt, start_step=step)  # resumes and saves again
    assert (tmp_path / "step-5" / "optimizer.pt").is_file()
    with pytest.raises(InputError, match="teacher"):
        recover(compressed, [(data[0],)], RecoveryConfig(steps=1, distill=0.5))
