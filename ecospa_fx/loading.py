"""Load what the command line is given, offline: a local Hugging Face model directory (config.json + weights,
or a GGUF file as transformers reads it) or an ecospa_fx artifact (a directory written by ``ecospa_fx.save``)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecospa_fx.errors import EcospaError, InputError, one_line

WHAT = "pass a local Hugging Face model directory (config.json + weights) or an ecospa_fx artifact directory"


@dataclass
class Source:
    """A loaded model: ``model`` (eval, fp32), its Hugging Face ``config`` (None for a plain artifact),
    whether it is an ``artifact``, and the ``path`` it came from."""

    model: Any
    config: Any
    path: Path
    artifact: bool


def offline() -> None:
    """Never reach for the hub; keep transformers' own progress bars and warnings out of the output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def is_artifact(path: Path) -> bool:
    return (path / "ecospa.json").is_file()


def check_model_path(path: Path, gguf_file: str | None = None) -> None:
    """One-line errors, with what to do, for paths that cannot hold a model."""
    if not path.exists():
        raise InputError(f"{path} does not exist: {WHAT}")
    if path.is_file() and path.suffix == ".gguf":
        raise InputError(f"{path} is a file: pass its folder and the file name, {path.parent} --gguf-file {path.name}")
    if not path.is_dir():
        raise InputError(f"{path} is not a directory: {WHAT}")
    if gguf_file and not (path / gguf_file).is_file():
        raise InputError(f"{path} has no GGUF file {gguf_file}: --gguf-file names a file inside the directory")
    if not gguf_file and not is_artifact(path) and not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (it has {ggufs[0]}: add --gguf-file {ggufs[0]})" if ggufs else ""
        raise InputError(
            f"{path} has no config.json: not a Hugging Face model directory (nor an ecospa_fx "
            f"artifact: no ecospa.json){hint}; {WHAT}"
        )


def load_source(
    path: Path, gguf_file: str | None = None, example_inputs: tuple | None = None, dynamic: bool = False
) -> Source:
    """A model directory or an artifact. Artifacts are rebuilt with ``ecospa_fx.load``, captured on
    ``example_inputs`` (default: the saved shapes), with dynamic batch/seq when ``dynamic`` (falling back
    to static shapes when the model pins them)."""
    check_model_path(path, gguf_file)
    if not is_artifact(path):
        model, config = load_model(path, gguf_file)
        return Source(model, config, path, artifact=False)
    return Source(load_artifact(path, example_inputs, dynamic), artifact_config(path), path, artifact=True)


def load_artifact(path: Path, example_inputs: tuple | None = None, dynamic: bool = False, kv: bool = False):
    """``ecospa_fx.load`` with dynamic batch/seq when asked and possible; ``kv`` rebuilds a causal LM with
    its KV cache (for generation), else the plain ``(input_ids,)`` forward the other commands run."""
    from ecospa_fx.artifact import load
    from ecospa_fx.export import token_dynamic_shapes
    from passes.capture import CaptureFailed

    if dynamic and example_inputs is not None and not kv:
        try:
            return load(
                path, example_inputs=example_inputs, dynamic_shapes=token_dynamic_shapes(example_inputs), kv=False
            )
        except CaptureFailed:
            pass
    try:
        return load(path, example_inputs=example_inputs, kv=kv)
    except CaptureFailed as err:
        raise EcospaError(f"cannot rebuild the artifact {path}: {str(err).splitlines()[0]}") from err


def artifact_plan(path: Path) -> dict[str, Any]:
    """An artifact's ``ecospa.json``, checked (``InputError`` naming the file and field when it is damaged)."""
    from ecospa_fx.artifact_format import read_plan

    return read_plan(path)


def artifact_config(path: Path):
    """The Hugging Face config saved in an artifact, or None."""
    from ecospa_fx.artifact_format import hf_config

    return hf_config(artifact_plan(path), path)[1]


def load_model(model_dir: Path, gguf_file: str | None, cache: bool = False):
    """A model from a local directory: eval, fp32, no KV cache (with ``cache=True``: with it, to generate).
    ``config.architectures`` picks ``AutoModelForCausalLM`` (a ``*ForCausalLM``) or ``AutoModel``; a GGUF
    config has none, so a causal LM is tried first. A GGUF-loaded model is dequantized by transformers but
    still flagged quantized (it refuses ``.float()``, ``.double()`` and ``save_pretrained``): it is rebuilt
    as a plain model."""
    check_model_path(model_dir, gguf_file)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with _quiet_gguf():
            _, model = _from_pretrained(model_dir, extra, cache)
    except EcospaError:
        raise
    except Exception as err:  # transformers reports bad configs and weights with many error types
        raise InputError(_load_failure(model_dir, gguf_file, err)) from err
    return _dequantized(model).float().eval(), model.config


def _from_pretrained(model_dir: Path, extra: dict[str, Any], cache: bool = False):
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, **extra)
    if hasattr(config, "use_cache"):
        config.use_cache = cache
    archs = config.architectures or []
    causal = any(a.endswith("ForCausalLM") for a in archs) or not archs
    if causal:
        try:
            return config, AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32, **extra)
        except ValueError:  # no causal-LM class for this config: fall back to the base model
            if archs:
                raise
    return config, AutoModel.from_pretrained(model_dir, config=config, dtype=torch.float32, **extra)


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar (not covered by its progress-bar switch): hide it,
    the command line shows its own spinner."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_failure(model_dir: Path, gguf_file: str | None, err: Exception) -> str:
    first = one_line(err).rstrip(".")
    if gguf_file:
        todo = (
            "check that it is a complete GGUF of an architecture transformers reads (llama, mistral, qwen2, "
            "...), or pass a Hugging Face directory instead"
        )
        return f"transformers cannot read the GGUF {model_dir / gguf_file}: {first}; {todo}"
    return (
        f"transformers cannot load {model_dir}: {first}; check config.json and the weight files "
        "(save the model with save_pretrained)"
    )


def _dequantized(model):
    if getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None):
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain


def load_tokenizer(path: Path, gguf_file: str | None = None, fallback: Path | None = None):
    """The tokenizer of a model directory (or of an artifact, which ``compress`` saves it into), else of
    ``fallback``; an error that says to pass ``--tokenizer`` when there is none."""
    from transformers import AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    for where in (path, fallback):
        if where is None or not Path(where).is_dir():
            continue
        try:
            return AutoTokenizer.from_pretrained(where, **(extra if where == path else {}))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise InputError(
        f"no tokenizer in {path}: pass --tokenizer DIR (a folder with tokenizer.json, e.g. the "
        "original model directory)"
    )
