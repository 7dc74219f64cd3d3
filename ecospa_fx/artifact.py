"""Save and load compressed models as safetensors + JSON (no pickle anywhere).

An artifact directory holds:

- ``model.safetensors``: the compressed module's state (parameters and buffers, original names);
- ``ecospa.json``: the plan (every removed index per parameter dimension), the granularity, the example
  input specs, and for Hugging Face models the source class and config; ``hf_export`` says whether a
  transformers-loadable copy was written and, when not, why;
- ``hf/`` (Hugging Face models whose kept widths are uniform and that a changed config describes exactly,
  see ``ecospa_fx.hf_config``): ``config.json`` + weights for ``AutoModel*.from_pretrained(artifact / "hf")``.

Loading rebuilds the architecture (from the saved Hugging Face config, or from a fresh ``model`` the
caller passes), replays capture and discovery on it, applies the saved plan with the same rewrite, and
loads the saved tensors. The result computes exactly what the saved model computed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ecospa_fx.errors import InputError
from passes.capture import capture
from passes.dataflow import analyse
from passes.groups import unit_components
from passes.rewrite import apply_plan

FORMAT_VERSION = 1
WEIGHTS, PLAN, HF_DIR = "model.safetensors", "ecospa.json", "hf"


def save(compressed: torch.nn.Module, path: str | Path, *, hf: bool = True) -> Path:
    """Write ``compressed`` (what ``ecospa_fx.compress`` returned) to the directory ``path``; with ``hf``
    also a transformers-loadable ``hf/`` copy when a config describes it exactly (``ecospa.json``'s
    ``hf_export`` says what happened)."""
    report = getattr(compressed, "ecospa_report", None)
    source = getattr(compressed, "ecospa_source", None)
    if report is None or source is None:
        raise InputError("save() takes the module returned by ecospa_fx.compress")
    if source["inputs"] is None:
        raise InputError("save() supports models whose example inputs are all tensors")
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create {out}: {err.strerror}") from None
    state = {k: v.detach().contiguous().clone() for k, v in compressed.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    plan = {
        "format": FORMAT_VERSION,
        "granularity": report.granularity,
        "sparsity": report.sparsity,
        "removed": [[name, dim, list(idx)] for (name, dim), idx in sorted(report.removed.items())],
        "compensated": list(getattr(compressed, "ecospa_compensated", ())),
        "inputs": source["inputs"],
        "hf_class": source.get("hf_class"),
        "hf_config": source.get("hf_config"),
        "hf_export": _write_hf(compressed, out, source) if hf else {"written": None, "reason": "not requested"},
    }
    (out / PLAN).write_text(json.dumps(plan, indent=1))
    return out


def annotate(path: str | Path, **fields: Any) -> None:
    """Add ``fields`` to a saved artifact's ``ecospa.json`` (e.g. where the source model lives)."""
    plan_path = Path(path) / PLAN
    plan = json.loads(plan_path.read_text())
    plan.update(fields)
    plan_path.write_text(json.dumps(plan, indent=1))


def hf_export_info(path: str | Path) -> dict[str, Any]:
    """The ``hf_export`` record of a saved artifact (``written``: the folder or None, ``reason``)."""
    plan = json.loads((Path(path) / PLAN).read_text())
    return plan.get("hf_export") or {"written": None, "reason": "artifact written before hf export existed"}


def _write_hf(compressed: torch.nn.Module, out: Path, source: dict[str, Any]) -> dict[str, Any]:
    """Save the Hugging Face equivalent under ``out / HF_DIR`` when there is one; the JSON record."""
    from ecospa_fx.hf_config import hf_equivalent

    vocab = (source.get("hf_config") or {}).get("vocab_size", 2)
    equivalent = hf_equivalent(compressed, random_inputs(source["inputs"], vocab))
    stale = out / HF_DIR
    if stale.is_dir() and (stale / "config.json").is_file():  # an earlier save's copy: never leave it behind
        shutil.rmtree(stale)
    if equivalent.model is None:
        return equivalent.to_json(None)
    equivalent.model.save_pretrained(str(out / HF_DIR))
    return equivalent.to_json(HF_DIR)


def random_inputs(specs: list[dict[str, Any]], vocab: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs shaped as the saved specs: token ids in ``[0, vocab)``, or standard-normal floats."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        dtype = getattr(torch, spec["dtype"])
        if dtype.is_floating_point:
            out.append(torch.randn(spec["shape"], generator=generator, dtype=dtype))
        else:
            out.append(torch.randint(0, vocab, spec["shape"], generator=generator, dtype=dtype))
    return tuple(out)


def load(
    path: str | Path,
    model: torch.nn.Module | None = None,
    *,
    example_inputs: tuple | None = None,
    dynamic_shapes: Any = None,
) -> torch.fx.GraphModule:
    """Rebuild a saved compressed model. ``model``: a freshly built instance of the original
    architecture (any weights); optional for Hugging Face models, whose config was saved.
    ``example_inputs`` (default: the saved shapes) and ``dynamic_shapes`` are the capture's: the result
    runs on inputs of those shapes (static capture) or of any batch/seq (dynamic)."""
    root = Path(path)
    if not (root / PLAN).is_file() or not (root / WEIGHTS).is_file():
        raise InputError(f"{root} is not an ecospa_fx artifact (expected {PLAN} and {WEIGHTS})")
    plan = json.loads((root / PLAN).read_text())
    if plan.get("format") != FORMAT_VERSION:
        raise InputError(f"unsupported artifact format {plan.get('format')!r}")
    model = model if model is not None else _rebuild_hf(plan)
    inputs = tuple(example_inputs) if example_inputs is not None else tuple(_example(s) for s in plan["inputs"])
    gm = capture(model, inputs, dynamic_shapes)
    analysis = analyse(gm)
    keep = _keep_mask(analysis.facts, plan["removed"], plan["granularity"])
    apply_plan(gm, analysis, keep)
    _restore_output_biases(gm, plan.get("compensated", []))
    state = load_file(str(root / WEIGHTS))
    missing, unexpected = gm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"artifact does not match the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return gm


def _restore_output_biases(gm: torch.fx.GraphModule, nodes: list[str]) -> None:
    """Recreate the bias parameters that ``compress(compensate=True)`` folded into these linears (zeros
    here; ``load_state_dict`` then fills in the saved values)."""
    from passes.importance.compensate import add_output_biases

    graph_nodes = {n.name: n for n in gm.graph.nodes}
    missing = [name for name in nodes if name not in graph_nodes]
    if missing:
        raise InputError(f"artifact compensated linears {missing[:3]} that this capture of the model lacks")
    zeros = {}
    for name in nodes:
        weight = gm.get_parameter(graph_nodes[name].args[1].target)
        zeros[name] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    if zeros:
        add_output_biases(gm, zeros)
    gm.ecospa_compensated = tuple(nodes)


def source_info(model: torch.nn.Module, inputs: tuple) -> dict[str, Any]:
    """What ``save`` needs to rebuild the architecture later (recorded by ``compress``)."""
    tensors = all(isinstance(x, torch.Tensor) for x in inputs)
    info: dict[str, Any] = {"inputs": [_spec(x) for x in inputs] if tensors else None}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and type(model).__module__.startswith("transformers"):
        info["hf_class"] = type(model).__name__
        info["hf_config"] = config.to_dict()
    return info


def _spec(x: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}


def _example(spec: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, spec["dtype"])
    if dtype.is_floating_point:
        return torch.zeros(spec["shape"], dtype=dtype)
    return torch.ones(spec["shape"], dtype=dtype)


def _rebuild_hf(plan: dict[str, Any]) -> torch.nn.Module:
    if not plan.get("hf_class"):
        raise InputError("this artifact was not made from a Hugging Face model: pass model=<fresh instance>")
    import transformers

    cls = getattr(transformers, plan["hf_class"], None)
    if cls is None:
        raise InputError(f"transformers has no class {plan['hf_class']}")
    config = cls.config_class.from_dict(plan["hf_config"])
    return cls(config).eval()


def _keep_mask(facts, removed: list, granularity: str) -> np.ndarray:
    """Keep mask over all channels: a unit goes when any of its channels was recorded as removed."""
    keep = np.ones(facts.n_channels, dtype=bool)
    spaces = {(s.param, s.dim): s for s in facts.spaces if not s.is_virtual}
    for name, dim, idx in removed:
        space = spaces.get((name, dim))
        if space is None:
            raise InputError(f"artifact removes channels of {name}[{dim}], which this architecture lacks")
        keep[space.offset + np.asarray(idx, dtype=np.int64)] = False
    comp = unit_components(facts, granularity)
    gone = np.unique(comp[~keep])
    keep[np.isin(comp, gone)] = False
    return keep
