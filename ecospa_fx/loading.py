"""Load a local Hugging Face model (a directory, or a GGUF file as transformers reads it), offline."""

from __future__ import annotations

from pathlib import Path


def load_model(model_dir: Path, gguf_file: str | None):
    """A model from a local directory: eval, fp32, no KV cache. ``config.architectures`` picks
    ``AutoModelForCausalLM`` (a ``*ForCausalLM``) or ``AutoModel``; a GGUF config has none, so a causal LM
    is tried first. A GGUF-loaded model is dequantized by transformers but still flagged quantized (it
    refuses ``.float()``, ``.double()`` and ``save_pretrained``): it is rebuilt as a plain model."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ecospa_fx.errors import EcospaError

    if not model_dir.exists():
        raise EcospaError(f"{model_dir} does not exist: pass a local Hugging Face model directory")
    if not model_dir.is_dir():
        raise EcospaError(f"{model_dir} is not a directory: pass a local Hugging Face model directory")
    if gguf_file and not (model_dir / gguf_file).is_file():
        raise EcospaError(f"{model_dir} has no GGUF file {gguf_file}")
    if not gguf_file and not (model_dir / "config.json").is_file():
        raise EcospaError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(model_dir, **extra)
        if hasattr(config, "use_cache"):
            config.use_cache = False
        archs = config.architectures or []
        causal = any(a.endswith("ForCausalLM") for a in archs) or not archs
        model = None
        if causal:
            try:
                model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32, **extra)
            except ValueError:  # no causal-LM class for this config: fall back to the base model
                if archs:
                    raise
        if model is None:
            model = AutoModel.from_pretrained(model_dir, config=config, dtype=torch.float32, **extra)
    except (OSError, ValueError, KeyError) as err:
        raise EcospaError(f"transformers cannot load {model_dir}: {str(err).strip().splitlines()[0]}") from err
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(model)(config)
        plain.load_state_dict(model.state_dict())
        model = plain
    return model.float().eval(), model.config
