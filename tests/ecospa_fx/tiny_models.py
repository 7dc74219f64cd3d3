"""Tiny local Hugging Face model directories (random weights, a word-level tokenizer) and a text file, for
tests that drive the command line. Nothing comes from the hub."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families. "
) * 12
VOCAB = 64


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
    )


def bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def make_dirs(root: Path) -> dict[str, Path]:
    """``llama`` and ``bert`` model directories (with tokenizer) and ``text`` under ``root``."""
    tok = tokenizer()
    torch.manual_seed(0)
    paths = {"llama": root / "llama", "bert": root / "bert", "text": root / "text.txt"}
    LlamaForCausalLM(llama_config()).save_pretrained(paths["llama"])
    BertModel(bert_config()).save_pretrained(paths["bert"])
    for name in ("llama", "bert"):
        tok.save_pretrained(paths[name])
    paths["text"].write_text(TEXT, encoding="utf-8")
    return paths
