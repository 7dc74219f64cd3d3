"""``ecospa-fx generate`` and ``export --kv``: text from a model directory (compressed on the fly), from an
artifact written by ``compress`` and from the ONNX file ``export --kv`` writes, all agreeing token for token
(greedy); ``--json`` timings; clear errors for a non-causal model, a prompt longer than the model's positions
and a missing tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from ecospa_fx.cli import main
from tests.ecospa_fx.tiny_models import make_dirs

PROMPT = "It is a truth universally acknowledged that a single man"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_dirs(tmp_path_factory.mktemp("tiny_gen"))


@pytest.fixture(scope="module")
def artifact(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("art_gen") / "art"
    assert main(["compress", str(tiny["llama"]), "--out", str(out), "--granularity", "head", "--quiet"]) == 0
    return out


def _generate(capsys, *args) -> dict:
    capsys.readouterr()
    code = main(["generate", *map(str, args), "--prompt", PROMPT, "--max-new-tokens", "6", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def test_artifact_onnx_and_onnx_int8_generate(tiny, artifact, tmp_path, capsys):
    from_artifact = _generate(capsys, artifact)["outputs"][0]
    assert from_artifact["new_tokens"] >= 1 and from_artifact["prefill_ms"] > 0
    onnx = tmp_path / "lm.onnx"
    capsys.readouterr()
    genai = tmp_path / "genai"
    assert main(["export", str(artifact), "--out", str(onnx), "--kv", "--int8", "--genai", str(genai), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["genai"] == str(genai) and (genai / "genai_config.json").is_file()
    assert record["max_abs_diff"]["logits"] < 1e-3 and 0 <= record["int8"]["top1_agreement"] <= 1
    from_onnx = _generate(capsys, onnx, "--tokenizer", artifact)["outputs"][0]
    assert from_onnx["text"] == from_artifact["text"]
    assert _generate(capsys, tmp_path / "lm.int8.onnx", "--tokenizer", artifact)["outputs"][0]["new_tokens"] >= 1


def test_model_directory_compressed_here_with_compare(tiny, capsys):
    outputs = _generate(capsys, tiny["llama"], "--sparsity", "0.5", "--compare")["outputs"]
    assert [o["model"] for o in outputs] == ["llama (dense)", "llama at 0.5"]
    assert outputs[1]["params"] < outputs[0]["params"]


def test_sampling_is_seeded(tiny, capsys):
    a = _generate(capsys, tiny["llama"], "--sample", "--temperature", "1.5", "--seed", "3")
    b = _generate(capsys, tiny["llama"], "--sample", "--temperature", "1.5", "--seed", "3")
    assert a["outputs"][0]["text"] == b["outputs"][0]["text"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("encoder", "not a causal LM"),
        ("too_long", "positions"),
        ("no_tokenizer", "--tokenizer"),
    ],
)
def test_errors_are_one_line(tiny, tmp_path, capsys, case, message):
    model, extra = tiny["llama"], []
    if case == "encoder":
        model = tiny["bert"]
    elif case == "too_long":
        extra = ["--max-new-tokens", "100"]
    else:
        model = tmp_path / "bare"
        shutil.copytree(tiny["llama"], model)
        for f in model.glob("tokenizer*"):
            f.unlink()
        (model / "special_tokens_map.json").unlink(missing_ok=True)
    capsys.readouterr()
    code = main(["generate", str(model), "--prompt", PROMPT, "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
