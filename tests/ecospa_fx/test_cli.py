"""The ecospa-fx command line, end to end in a subprocess, on tiny local model directories (no hub):
compress -> artifact, figures and transformers copy; export -> ONNX with parity; eval -> perplexity and
fidelity; an error path with and without --debug. Steps that need no fresh interpreter run in process
(``ecospa_fx.cli.main``) to keep the file fast; more error paths are in test_cli_errors.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import ecospa_fx
from ecospa_fx.cli import main
from tests.ecospa_fx.tiny_models import make_dirs


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ecospa_fx", *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_dirs(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def artifact(tiny, tmp_path_factory):
    """compress at head granularity with activation scores on the text: every layer keeps 1 of 2 KV heads
    and 24 of 48 FFN channels (uniform), so a transformers copy is written."""
    out = tmp_path_factory.mktemp("art") / "art"
    proc = run(
        "compress",
        tiny["llama"],
        "--out",
        out,
        "--granularity",
        "head",
        "--importance",
        "activation",
        "--calibration",
        tiny["text"],
        "--batch",
        "2",
        "--seq",
        "16",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_help_lists_subcommands_and_exit_codes():
    out = run("--help")
    assert out.returncode == 0
    for word in ("demo", "inspect", "compress", "export", "eval", "exit codes", "onnxruntime"):
        assert word in out.stdout


def test_compress_writes_artifact_figures_and_transformers_copy(tiny, artifact):
    out, result = artifact
    assert result["ok"] and result["params_after"] < result["params_before"]
    assert result["groups"] == {"qk": 0, "vo": 0, "ffn": 2, "latent": 0, "head": 2}
    assert "<svg" in (out / "report.html").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["hf_export"]["written"] == "hf"
    assert result["hf_export"]["config_changes"]["num_key_value_heads"] == 1
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    reloaded = ecospa_fx.load(out, example_inputs=(x,))
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, reloaded(x).logits, atol=1e-5, rtol=1e-5)


def test_export_artifact_with_dynamic_axes(artifact, tmp_path):
    out, _ = artifact
    proc = run("export", out, "--out", tmp_path / "m.onnx", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "seq"}
    assert max(result["max_abs_diff"].values()) < 1e-4
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_eval_perplexity_of_artifact_and_its_transformers_copy_agree(tiny, artifact, capsys):
    out, _ = artifact
    proc = run("eval", out, "--text", tiny["text"], "--seq-len", "32", "--reference", tiny["llama"], "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]
    ours, dense = results[str(out)], results[str(tiny["llama"])]
    assert ours["tokens_scored"] == dense["tokens_scored"] > 0 and ours["perplexity"] > 1
    assert main(["eval", str(out / "hf"), "--text", str(tiny["text"]), "--seq-len", "32", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"perplexity {ours['perplexity']:.3f} over {ours['tokens_scored']} tokens"


def test_compress_encoder_then_eval_fidelity(tiny, tmp_path, capsys):
    assert main(["compress", str(tiny["bert"]), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote ") and len(out.strip().splitlines()) == 1
    plan = json.loads((tmp_path / "b" / "ecospa.json").read_text())
    assert plan["hf_export"]["written"] is None and "BertModel with" in plan["hf_export"]["reason"]
    ev = run("eval", tmp_path / "b", "--text", tiny["text"], "--seq-len", "16", "--json")  # reference: recorded
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)["result"]
    assert result["chunks"] >= 4 and -1 <= result["cosine_mean"] <= 1 and 0 <= result["top1_agreement"] <= 1


def test_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    proc = run("compress", tmp_path / "missing", "--out", tmp_path / "o")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"ecospa-fx compress: error: {tmp_path / 'missing'} does not exist: pass a local Hugging Face model "
        "directory (config.json + weights) or an ecospa_fx artifact directory"
    ]
    with pytest.raises(ecospa_fx.InputError, match="does not exist"):  # --debug: the exception, traceback and all
        main(["--debug", "inspect", str(tmp_path / "missing")])


def test_help_and_version_do_not_import_torch():
    """``ecospa-fx --help`` / ``--version`` answer before torch is imported (it took 4 s before)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ecospa_fx.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "from ecospa_fx.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
