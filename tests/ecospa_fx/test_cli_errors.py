"""Bad input to ecospa-fx (in process, through ``ecospa_fx.cli.main``): one line on stderr saying what is wrong
and what to do, no traceback, the documented exit code; --json also prints a JSON error object."""

from __future__ import annotations

import json

import pytest

from ecospa_fx.cli import EXIT_FAILED, EXIT_USAGE, main
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
    return {**paths, "root": root}


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
]


@pytest.mark.parametrize(("args", "code", "message"), CASES, ids=[" ".join(c[0][:1] + c[0][2:]) for c in CASES])
def test_bad_input_is_one_line(tiny, capsys, args, code, message):
    fill = {k: str(v) for k, v in tiny.items()}
    got, out, err = call(capsys, *(a.format(**fill) for a in args))
    assert got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecospa-fx") and message in lines[0], err
    assert "Traceback" not in err and out == ""


def test_json_mode_reports_the_error_on_stdout(tiny, capsys):
    code, out, err = call(capsys, "inspect", tiny["root"] / "missing", "--json")
    assert code == EXIT_FAILED and "does not exist" in err
    payload = json.loads(out)
    assert payload["ok"] is False and payload["exit_code"] == EXIT_FAILED and "does not exist" in payload["error"]


def test_missing_subcommand_is_a_usage_error(capsys):
    code, _, err = call(capsys)
    assert code == EXIT_USAGE and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["demo", "inspect", "compress", "export", "eval"])
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
