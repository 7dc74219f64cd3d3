"""Compressed causal LMs with a KV cache, shared by the generation tests (built once per session)."""

from __future__ import annotations

import functools

import torch

import ecospa_fx
from passes.verify import masked_copy
from tests.zoo import ALL_CASES, case_by_name

NOT_CAUSAL = {"hf_bert", "hf_vit", "hf_t5"}
CAUSAL_LMS = [  # recurrent caches (conv, state space) are not keys and values: compressed without a cache
    c.name for c in ALL_CASES if c.family == "hf" and c.name not in NOT_CAUSAL and not c.meta.get("recurrent_cache")
]


def cached_model(name: str) -> torch.nn.Module:
    """The zoo model as a user loads it for generation: ``use_cache=True`` (the zoo turns it off)."""
    model = case_by_name(name).build()
    model.config.use_cache = True
    return model


@functools.cache
def compressed(name: str, granularity: str, sparsity: float = 0.5):
    """(dense model, compressed KV module, masked dense copy): the masked copy is the dense model with every
    removed index zeroed, which generates what the compressed one must."""
    model = cached_model(name)
    ids = case_by_name(name).inputs()[0]
    small = ecospa_fx.compress(model, (ids,), sparsity, granularity=granularity)
    removed = [(m.param.removeprefix("model."), m.dim, m.removed) for g in small.report.groups for m in g.members]
    return model, small, masked_copy(model, removed)


def left_padded_prompt(vocab: int, seed: int = 1, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 7 tokens, the first left-padded by ``pad`` (token 0, mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :pad], mask[0, :pad] = 0, 0
    return ids, mask
