"""tools/export_onnx.py end to end in a subprocess, on a tiny local Llama directory (no hub)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "export_onnx.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_compresses_exports_and_checks_parity(model_dir, tmp_path):
    out = tmp_path / "sub" / "tiny.onnx"
    proc = run(str(model_dir), "--out", str(out), "--sparsity", "0.5", "--batch", "2", "--seq", "8")
    assert proc.returncode == 0, proc.stderr
    assert "compressed at sparsity 0.5" in proc.stdout
    assert "onnx.checker: ok" in proc.stdout
    assert "axis 0 = batch, axis 1 = seq" in proc.stdout
    diff = float(proc.stdout.rsplit("max abs diff: ", 1)[1].split()[0])
    assert diff < 1e-4
    graph = onnx.load(str(out)).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    assert graph.output[0].name == "logits"
    assert "Traceback" not in proc.stderr


def test_parity_above_tolerance_exits_3(model_dir, tmp_path):
    proc = run(
        str(model_dir),
        "--out",
        str(tmp_path / "m.onnx"),
        "--sparsity",
        "0",
        "--static",
        "--seq",
        "8",
        "--atol",
        "1e-12",
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "output 'logits': onnxruntime differs from PyTorch by" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("target", "out", "message"),
    [
        ("{tmp}/missing", "{tmp}/m.onnx", "does not exist"),
        ("{tmp}", "{tmp}/m.onnx", "no config.json: not a Hugging Face model directory"),
        ("{model}", "{tmp}/a_file/m.onnx", "a_file is a file, not a folder"),
        ("{model}", "{tmp}", "it is a directory"),
    ],
)
def test_errors_are_one_line(model_dir, tmp_path, target, out, message):
    (tmp_path / "a_file").write_text("")
    fill = {"tmp": str(tmp_path), "model": str(model_dir)}
    proc = run(target.format(**fill), "--out", out.format(**fill))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export_onnx: error:") and message in lines[0], proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = run(str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
