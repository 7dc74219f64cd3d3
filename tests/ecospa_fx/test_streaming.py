"""Streaming apply: a plan made on a weightless (meta) model, applied to safetensors shards one tensor at a
time, gives bit-identical tensors to the in-memory ``compress`` path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import ecospa_fx
from ecospa_fx.streaming import (
    INDEX,
    checkpoint_slices,
    open_checkpoint,
    plan_compression,
    shard_files,
    stream_apply,
    write_plan,
)


def _config(tied: bool) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
        tie_word_embeddings=tied,
    )


def _saved(tmp_path, tied: bool):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config(tied)).eval()
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="60KB")
    return model, src


def _meta(tied: bool):
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(_config(tied)).eval()


def _stream(tmp_path, model, src, config, calibration=None):
    meta = _meta(model.config.tie_word_embeddings)
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    weights = open_checkpoint(meta, src, extra=dict(model.named_buffers()))
    plan = plan_compression(meta, (ids,), config, weights=weights, calibration=calibration)
    slices = checkpoint_slices(meta, plan.slices, weights.index)
    out = tmp_path / "out"
    stats = stream_apply(src, slices, out, max_shard_bytes=50_000)
    write_plan(out, plan, slices)
    got: dict[str, torch.Tensor] = {}
    for file in stats["files"]:
        got.update(load_file(file))
    return plan, stats, got


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_streaming_apply_equals_in_memory(tmp_path, tied, importance):
    model, src = _saved(tmp_path, tied)
    assert len(shard_files(src)) >= 2
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randint(0, 128, (1, 8), generator=gen),) for _ in range(3)]
    config = ecospa_fx.CompressConfig(sparsity=0.5, importance=importance, refit="none")  # streaming: no refit
    extra = {"calibration": calibration} if importance == "activation" else {}
    ids = torch.randint(0, 128, (1, 8), generator=gen)
    reference = ecospa_fx.compress(model, (ids,), config=config, **extra)
    plan, stats, got = _stream(tmp_path, model, src, config, calibration if importance == "activation" else None)
    assert plan.report.removed == reference.ecospa_report.removed and plan.report.removed
    state = reference.state_dict()
    stored = set(load_file(shard_files(src)[0])) | {k for f in shard_files(src)[1:] for k in load_file(f)}
    assert set(got) == stored
    for name, tensor in got.items():
        assert torch.equal(tensor, state[name]), name
    assert len(stats["files"]) >= 2 and (tmp_path / "out" / INDEX).is_file()
    assert stats["bytes_out"] < stats["bytes_in"]


def test_output_shards_are_bounded_and_plan_is_written(tmp_path):
    model, src = _saved(tmp_path, tied=True)
    config = ecospa_fx.CompressConfig(sparsity=0.5, importance="magnitude")
    plan, stats, got = _stream(tmp_path, model, src, config)
    largest = max(t.numel() * t.element_size() for t in got.values())
    assert stats["largest_output_shard"] <= max(50_000, largest) and stats["largest_tensor"] == largest
    written = json.loads((tmp_path / "out" / "ecospa_stream.json").read_text())
    for name, dims in written["kept"].items():
        for dim, kept in dims.items():
            assert got[name].shape[int(dim)] == len(kept)
    assert {tuple(r[:2]) for r in written["removed"]} == set(plan.report.removed)
    assert np.all([len(v) for v in plan.report.removed.values()])


def test_tied_parameters_map_to_the_stored_alias(tmp_path):
    model, src = _saved(tmp_path, tied=True)
    weights = open_checkpoint(_meta(True), src)
    assert weights.names["lm_head.weight"] == "model.embed_tokens.weight"
    assert torch.equal(weights["lm_head.weight"], model.lm_head.weight)
    assert "lm_head.weight" in weights and "nonexistent.weight" not in weights


def test_streaming_refuses_an_explicit_refit(tmp_path):
    model, _ = _saved(tmp_path, tied=False)
    config = ecospa_fx.CompressConfig(sparsity=0.5, importance="activation", refit="dense")
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(ecospa_fx.InputError, match="refit"):
        plan_compression(model, (ids,), config, calibration=[(ids,)])
