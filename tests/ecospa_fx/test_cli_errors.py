"""Bad input to ecospa-fx (in process, through ``ecospa_fx.cli.main``): one line on stderr saying what is wrong
and what to do, no traceback, the documented exit code; --json also prints a JSON error object."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import pytest

from ecospa_fx.cli import EXIT_FAILED, EXIT_USAGE, build_parser, main
from tests.ecospa_fx.tiny_models import make_dirs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_err")
    paths = make_dirs(root)
    (root / "gguf").mkdir()
    (root / "gguf" / "model.gguf").write_bytes(b"not a gguf file at all")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("hello")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    shutil.copytree(paths["llama"], root / "badconfig")
    config = json.loads((root / "badconfig" / "config.json").read_text())
    (root / "badconfig" / "config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    return {**paths, "root": root, "badconfig": root / "badconfig"}


def call(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse usage errors
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


CASES = [
    (("inspect", "{root}/missing"), EXIT_FAILED, "does not exist: pass a local Hugging Face model directory"),
    (("compress", "{root}/notes.txt", "--out", "{root}/o"), EXIT_FAILED, "is not a directory"),
    (("inspect", "{root}/empty"), EXIT_FAILED, "no config.json: not a Hugging Face model directory"),
    (("inspect", "{root}/gguf"), EXIT_FAILED, "add --gguf-file model.gguf"),
    (("inspect", "{root}/gguf/model.gguf"), EXIT_FAILED, "pass its folder and the file name"),
    (("inspect", "{root}/gguf", "--gguf-file", "model.gguf"), EXIT_FAILED, "transformers cannot read the GGUF"),
    (("inspect", "{root}/gguf", "--gguf-file", "other.gguf"), EXIT_FAILED, "has no GGUF file other.gguf"),
    (("compress", "{llama}", "--out", "{root}/o", "--importance", "foo"), EXIT_USAGE, "invalid choice: 'foo'"),
    (
        ("compress", "{llama}", "--out", "{root}/o", "--importance", "activation"),
        EXIT_FAILED,
        "--importance activation needs --calibration TEXT",
    ),
    (("compress", "{llama}", "--out", "{root}/o", "--sparsity", "1.5"), EXIT_FAILED, "sparsity must be in [0, 1)"),
    (("eval", "{llama}", "--text", "{root}/missing.txt"), EXIT_FAILED, "--text takes a UTF-8 text file"),
    (("eval", "{llama}", "--text", "{root}/latin1.txt", "--seq-len", "2"), EXIT_FAILED, "is not UTF-8 text"),
    (("eval", "{llama}", "--text", "{text}"), EXIT_FAILED, "exceeds the model's 64 positions: pass --seq-len 64"),
    (("eval", "{llama}", "--text", "{root}/notes.txt", "--seq-len", "8"), EXIT_FAILED, "fewer than --seq-len 8"),
    (("eval", "{bert}", "--text", "{text}", "--seq-len", "16"), EXIT_FAILED, "pass --reference DENSE_MODEL_DIR"),
    (("eval", "{llama}", "--text", "{text}", "--seq-len", "8", "--stride", "9"), EXIT_FAILED, "--stride must be"),
    (("export", "{llama}", "--out", "{root}"), EXIT_FAILED, "it is a directory; give a file name"),
    (("export", "{llama}", "--out", "{root}/m.onnx", "--batch", "0"), EXIT_FAILED, "must be positive"),
    (("compress", "{llama}", "--out", "{text}"), EXIT_FAILED, "is a file: give a directory for the artifact"),
    (("compress", "{llama}", "--out", "{text}/o"), EXIT_FAILED, "is a file, so the artifact directory cannot"),
    (
        ("compress", "{llama}", "--out", "{root}/o", "--calibration", "{root}/missing.txt"),
        EXIT_FAILED,
        "--calibration takes a UTF-8 text file",
    ),
    (
        ("compress", "{llama}", "--out", "{root}/o", "--calibration", "{root}/latin1.txt"),
        EXIT_FAILED,
        "is not UTF-8 text: --calibration takes",
    ),
    (
        ("compress", "{llama}", "--out", "{root}/o", "--calibration", "{root}/notes.txt", "--seq", "8"),
        EXIT_FAILED,
        "fewer than --seq 8: use a longer text or a smaller --seq",
    ),
    (
        ("compress", "{llama}", "--out", "{root}/o", "--calibration", "{text}", "--seq", "1"),
        EXIT_FAILED,
        "--calibration needs --seq 2 or more",
    ),
    (("inspect", "{badconfig}"), EXIT_FAILED, "expected int, got str"),
    (("compress", "{badconfig}", "--out", "{root}/o"), EXIT_FAILED, "transformers cannot load"),
]


@pytest.mark.parametrize(("args", "code", "message"), CASES, ids=[" ".join(c[0][:1] + c[0][2:]) for c in CASES])
def test_bad_input_is_one_line(tiny, capsys, args, code, message):
    fill = {k: str(v) for k, v in tiny.items()}
    got, out, err = call(capsys, *(a.format(**fill) for a in args))
    assert got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecospa-fx") and message in lines[0], err
    assert "Traceback" not in err and out == ""
    assert_flags_exist(args[0], lines[0])


def subcommand_options(command: str) -> set[str]:
    """Every option string (``--seq``, ``-q``, ...) the ``command`` subparser accepts."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices[command]._option_string_actions)


def assert_flags_exist(command: str, message: str) -> None:
    """A message may only tell the user about flags that ``command`` has."""
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", message))
    unknown = sorted(named - subcommand_options(command))
    assert not unknown, f"{command} has no {unknown}: {message}"


def test_flag_check_catches_flags_of_other_subcommands():
    assert_flags_exist("eval", "fewer than --seq-len 8")
    with pytest.raises(AssertionError):
        assert_flags_exist("compress", "fewer than --seq-len 8")


def test_out_file_is_refused_before_loading(tiny, capsys, monkeypatch):
    def no_loading(*_args, **_kwargs):
        raise AssertionError("compress loaded the model before checking --out")

    monkeypatch.setattr("ecospa_fx.loading.load_model", no_loading)
    code, _, err = call(capsys, "compress", tiny["llama"], "--out", tiny["text"])
    assert code == EXIT_FAILED and "is a file" in err


# ------------------------------------------------------------------ damaged or edited artifacts
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny Llama artifact, written once by ecospa_fx.save."""
    import torch
    import transformers

    import ecospa_fx
    from tests.ecospa_fx.tiny_models import llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("artifact") / "art"
    ecospa_fx.save(ecospa_fx.compress(model, (ids,), 0.5, kinds=("ffn",)), out, hf=False)
    return out


def _truncate(art):
    weights = art / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _edit(art, **fields):
    plan = json.loads((art / "ecospa.json").read_text())
    for key, value in fields.items():
        target = plan
        *path, last = key.split("__")
        for part in path:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
    (art / "ecospa.json").write_text(json.dumps(plan))


DAMAGE = {
    "truncated weights": (_truncate, "model.safetensors differs from the sha256"),
    "empty weights": (lambda a: (a / "model.safetensors").write_bytes(b""), "model.safetensors differs"),
    "not json": (lambda a: (a / "ecospa.json").write_text("{"), "ecospa.json is not valid JSON"),
    "removed": (lambda a: _edit(a, removed=5), "'removed' must be a list"),
    "huge input": (lambda a: _edit(a, inputs__0__shape=[200000, 400000]), "more than the 16,777,216 allowed"),
    "hf_config": (lambda a: _edit(a, hf_config__vocab_size=10**9), "does not match model.safetensors"),
    "hf_config type": (lambda a: _edit(a, hf_config__hidden_size="wide"), "has an 'hf_config' LlamaForCausalLM"),
}
COMMANDS = {
    "inspect": ("inspect", "{art}"),
    "export": ("export", "{art}", "--out", "{tmp}/m.onnx"),
    "eval": ("eval", "{art}", "--text", "{text}", "--seq-len", "8", "--tokenizer", "{llama}"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_artifact_is_bad_input(tiny, artifact, tmp_path, capsys, command, damage):
    """Corrupt, truncated or edited artifacts exit 1 with a line naming the file (not 5 or 0)."""
    if command == "inspect" and damage in ("hf_config", "hf_config type"):
        pytest.skip("inspect does not rebuild the model")
    art = shutil.copytree(artifact, tmp_path / "art")
    edit, message = DAMAGE[damage]
    edit(art)
    fill = {"art": art, "tmp": tmp_path, "text": tiny["text"], "llama": tiny["llama"]}
    code, _, err = call(capsys, *(a.format(**fill) for a in COMMANDS[command]))
    lines = err.strip().splitlines()
    assert code == EXIT_FAILED, err
    assert len(lines) == 1 and message in lines[0] and str(art) in lines[0], err
    assert_flags_exist(command, lines[0])


def test_inspect_says_whether_the_weights_were_verified(artifact, tmp_path, capsys):
    code, out, _ = call(capsys, "inspect", artifact, "--json")
    assert code == 0 and json.loads(out)["checksums"] == "verified"
    art = shutil.copytree(artifact, tmp_path / "old")
    plan = json.loads((art / "ecospa.json").read_text())
    del plan["checksums"]
    (art / "ecospa.json").write_text(json.dumps(plan))
    code, out, _ = call(capsys, "inspect", art)
    assert code == 0 and "not verified (no checksums recorded" in out


def test_json_mode_reports_the_error_on_stdout(tiny, capsys):
    code, out, err = call(capsys, "inspect", tiny["root"] / "missing", "--json")
    assert code == EXIT_FAILED and "does not exist" in err
    payload = json.loads(out)
    assert payload["ok"] is False and payload["exit_code"] == EXIT_FAILED and "does not exist" in payload["error"]


def test_missing_subcommand_is_a_usage_error(capsys):
    code, _, err = call(capsys)
    assert code == EXIT_USAGE and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["demo", "demo-llm", "inspect", "compress", "export", "generate", "eval"])
def test_every_subcommand_has_help_with_modes_and_exit_codes(capsys, command):
    code, out, _ = call(capsys, command, "--help")
    assert code == 0
    for word in ("--quiet", "--json", "--debug", "exit codes", "interrupted"):
        assert word in out


def test_exit_codes_of_parity_and_verification_failures():
    from ecospa_fx import ParityError, VerificationError
    from ecospa_fx.cli import EXIT_INTERNAL, EXIT_PARITY, EXIT_VERIFY, _describe

    assert _describe(ParityError("output 'logits' differs", "logits", 1.0, 1e-4)) == (
        "output 'logits' differs",
        EXIT_PARITY,
    )
    assert _describe(VerificationError("differs\nmore"))[1] == EXIT_VERIFY
    message, code = _describe(ZeroDivisionError("x"))
    assert code == EXIT_INTERNAL and "rerun with --debug" in message


def test_compress_says_how_many_calibration_tokens_and_warns_when_few(tiny, tmp_path, capsys):
    args = ["compress", str(tiny["llama"]), "--out", str(tmp_path / "o"), "--calibration", str(tiny["text"])]
    code, out, err = call(capsys, *args, "--batch", "2", "--seq", "8", "--json")
    assert code == 0 and json.loads(out)["calibration_tokens"] == 4 * 2 * 8
    assert "calibration used only 64 tokens" in err and len(err.strip().splitlines()) == 1
