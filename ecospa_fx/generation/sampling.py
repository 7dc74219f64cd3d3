"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ecospa_fx.errors import InputError


@dataclass(frozen=True)
class Sampling:
    """``do_sample=False`` is greedy (argmax, deterministic). Sampling scales logits by 1/temperature,
    keeps the ``top_k`` most likely tokens (0: all) and the smallest set whose probability reaches
    ``top_p`` (1.0: all), and draws with a generator seeded by ``seed``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")

    def chooser(self):
        """A function ``logits [B, V] -> token ids [B]`` (one generator for the whole generation)."""
        if not self.do_sample:
            return lambda logits: logits.argmax(-1)
        gen = torch.Generator().manual_seed(self.seed)

        def choose(logits: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(self._filtered(logits.float() / self.temperature), -1)
            return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)

        return choose

    def _filtered(self, logits: torch.Tensor) -> torch.Tensor:
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            ordered, index = torch.sort(logits, descending=True, dim=-1)
            cumulative = torch.softmax(ordered, -1).cumsum(-1)
            drop = cumulative - torch.softmax(ordered, -1) >= self.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
        return logits
