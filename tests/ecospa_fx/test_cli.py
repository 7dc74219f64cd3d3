"""The ecospa-fx command line, end to end in a subprocess, on a tiny local model directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ecospa_fx


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ecospa_fx", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    for sub in ("demo", "inspect", "compress"):
        assert sub in out.stdout


def test_inspect_prints_groups(model_dir):
    out = run("inspect", str(model_dir), "--seq", "8")
    assert out.returncode == 0, out.stderr
    assert "qk" in out.stdout and "ffn" in out.stdout and "left dense" in out.stdout


def test_compress_writes_artifact_and_figure_that_reload(model_dir, tmp_path):
    out = run("compress", str(model_dir), "--out", str(tmp_path / "art"), "--sparsity", "0.5", "--seq", "8", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["params_after"] < result["params_before"]
    assert result["groups"] == {"qk": 2, "vo": 2, "ffn": 2, "head": 0}
    html = (tmp_path / "art" / "report.html").read_text()
    assert "<svg" in html and "kept width" in html
    reloaded = ecospa_fx.load(tmp_path / "art")
    assert reloaded(torch.ones(1, 8, dtype=torch.long)).logits.shape == (1, 8, 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("inspect", "/no/such/dir"), "does not exist"),
        (("compress", "/no/such/dir", "--out", "/tmp/x"), "does not exist"),
        (("compress", "{model}", "--out", "{tmp}/o", "--sparsity", "1.5"), "sparsity must be in [0, 1)"),
    ],
)
def test_errors_are_one_line_without_traceback(args, message, model_dir, tmp_path):
    out = run(*(a.format(model=model_dir, tmp=tmp_path) for a in args))
    assert out.returncode == 1
    assert message in out.stderr
    assert "Traceback" not in out.stderr
