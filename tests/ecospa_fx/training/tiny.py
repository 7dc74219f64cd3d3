"""A tiny Llama (GQA, RoPE, SwiGLU; random weights) and learnable token data, shared by the training tests."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB, SEQ, BATCH = 64, 16, 2


def tiny_llama(seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    return tf.LlamaForCausalLM(config)


def batches(n: int, seed: int = 1, batch: int = BATCH) -> list[torch.Tensor]:
    """Token batches with structure to learn: every odd position repeats the token before it."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (n, batch, SEQ), generator=g)
    data[..., 1::2] = data[..., ::2]
    return list(data)
