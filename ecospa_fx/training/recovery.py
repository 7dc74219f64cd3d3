"""Recovery fine-tuning after one-shot ``compress``: continue training the small model on text, optionally
distilling from the dense model, with checkpoints that reload through ``ecospa_fx.save`` / ``load``.

Loss per batch (next-token targets ``y``, student logits ``s``, teacher logits ``t``, temperature ``T``):

    L = (1 - a) * CE(s, y) + a * T^2 * KL( softmax(t / T) || softmax(s / T) )

averaged over tokens (``a = distill``; ``a = 0`` is plain fine-tuning and needs no teacher). The ``T^2``
keeps the soft-target gradient on the scale of the hard one (Hinton et al. 2015).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ecospa_fx.artifact import PLAN, load, save
from ecospa_fx.errors import InputError
from ecospa_fx.training.graph import allow_mode_switch, causal_lm_loss, logits_of, removed_report

OPTIMIZER_FILE, STEP_FILE = "optimizer.pt", "training.json"


@dataclass(frozen=True)
class RecoveryConfig:
    """steps: optimizer steps; lr, weight_decay: AdamW; distill: weight ``a`` of the KL term in [0, 1];
    temperature: ``T > 0``; checkpoint_dir / checkpoint_every: save every that many steps (0: only at the end)."""

    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    distill: float = 0.0
    temperature: float = 1.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be a positive int, got {self.steps!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise InputError(f"distill is the weight of the KL term, in [0, 1]; got {self.distill}")
        if self.temperature <= 0 or self.lr <= 0:
            raise InputError(f"temperature and lr must be positive, got {self.temperature}, {self.lr}")
        if self.checkpoint_every < 0:
            raise InputError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")


@dataclass
class RecoveryResult:
    losses: list[float] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor | None, ids: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """``(1 - a) CE + a T^2 KL(teacher || student)`` over all next-token positions (module docstring)."""
    hard = causal_lm_loss(student, ids)
    if teacher is None or alpha == 0.0:
        return hard
    s = F.log_softmax(student[:, :-1].float() / temperature, dim=-1).flatten(0, 1)
    t = F.log_softmax(teacher[:, :-1].float() / temperature, dim=-1).flatten(0, 1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    return (1.0 - alpha) * hard + alpha * temperature**2 * kl


def recover(
    student: torch.nn.Module,
    batches: Iterable[tuple],
    config: RecoveryConfig,
    teacher: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
) -> RecoveryResult:
    """Fine-tune ``student`` (a compressed graph) for ``config.steps`` on ``batches`` (cycled; each a tuple
    whose first element is ``input_ids``), distilling from ``teacher`` when ``config.distill > 0``."""
    if config.distill > 0 and teacher is None:
        raise InputError("distill > 0 needs the dense teacher model")
    allow_mode_switch(student)
    optimizer = optimizer or torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    result = RecoveryResult()
    data = itertools.cycle(batches)
    for step in range(start_step + 1, start_step + config.steps + 1):
        batch = next(data)
        t = None
        if config.distill > 0:
            with torch.no_grad():
                t = logits_of(teacher(*batch))
        loss = distillation_loss(logits_of(student(*batch)), t, batch[0], config.distill, config.temperature)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(float(loss.detach()))
        last = step == start_step + config.steps
        if config.checkpoint_dir and (last or (config.checkpoint_every and step % config.checkpoint_every == 0)):
            where = Path(config.checkpoint_dir) / f"step-{step}"
            result.checkpoints.append(save_checkpoint(where, student, optimizer, step))
    return result


def save_checkpoint(path: str | Path, module: torch.nn.Module, optimizer=None, step: int = 0) -> Path:
    """``ecospa_fx.save`` of the module (safetensors + plan) plus the optimizer state and the step."""
    out = save(module, path)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), out / OPTIMIZER_FILE)
    (out / STEP_FILE).write_text(json.dumps({"step": step}))
    return out


def load_checkpoint(path: str | Path, model: torch.nn.Module | None = None, optimizer_lr: float | None = None):
    """``(module, optimizer or None, step)``; the optimizer is an AdamW over the module's parameters with the
    saved state (``optimizer_lr`` given or not, the saved hyper-parameters win)."""
    root = Path(path)
    module = load(root, model)
    allow_mode_switch(module)
    _annotate(module, json.loads((root / PLAN).read_text()))
    optimizer = None
    if (root / OPTIMIZER_FILE).is_file():
        optimizer = torch.optim.AdamW(module.parameters(), lr=optimizer_lr or 1e-4)
        optimizer.load_state_dict(torch.load(root / OPTIMIZER_FILE, weights_only=True))
    step = json.loads((root / STEP_FILE).read_text())["step"] if (root / STEP_FILE).is_file() else 0
    return module, optimizer, step


def _annotate(module: torch.nn.Module, plan: dict) -> None:
    """What ``save`` needs, from the artifact's plan, so a reloaded checkpoint can be saved again."""
    origin, dense = {}, {}
    params = dict(module.named_parameters(remove_duplicate=False))
    for name, dim, removed in plan["removed"]:
        size = params[name].shape[dim] + len(removed)
        dense[(name, dim)] = size
        origin[(name, dim)] = sorted(set(range(size)) - set(removed))
    module.ecospa_report = removed_report(origin, dense, plan["sparsity"], plan["granularity"])
    module.ecospa_source = {k: plan.get(k) for k in ("inputs", "hf_class", "hf_config")}
