"""Save and load compressed models as safetensors + JSON (no pickle anywhere).

An artifact directory holds:

- ``model.safetensors``: the compressed module's state (parameters and buffers, original names), each
  tensor once: tied names (an embedding shared with the LM head) are listed in ``ecospa.json``'s ``aliases``;
- ``ecospa.json``: the plan (every removed index per parameter dimension), the granularity, the example
  input specs, and for Hugging Face models the source class and config; ``hf_export`` says whether a
  transformers-loadable copy was written and, when not, why;
- ``hf/`` (Hugging Face models whose kept widths are uniform and that a changed config describes exactly,
  see ``ecospa_fx.hf_config``): ``config.json`` + weights for ``AutoModel*.from_pretrained(artifact / "hf")``.

``ecospa.json``'s ``checksums`` holds the sha256 of each weight file (and of ``hf/config.json``); ``load`` and
``check_artifact`` (what ``ecospa-fx inspect`` runs) compare them. ``ecospa_fx.artifact_format`` checks every
field before anything is built or allocated.

Loading rebuilds the architecture (from the saved Hugging Face config, or from a fresh ``model`` the
caller passes), replays capture and discovery on it, applies the saved plan with the same rewrite, and
loads the saved tensors (re-tying aliases). The result computes exactly what the saved model computed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ecospa_fx.artifact_format import (
    FORMAT_VERSION,
    HF_DIR,
    PLAN,
    WEIGHTS,
    architecture_problem,
    buffer_problem,
    checksums,
    damaged,
    hf_config,
    read_plan,
    read_tensors,
    stored_shapes,
    verify_checksums,
)
from ecospa_fx.errors import InputError, one_line
from ecospa_fx.generation.causal_lm import KV_PREFIX, KVCacheLM, is_cached_causal_lm, recurrent_cache_layers
from ecospa_fx.generation.target import CaptureTarget, KVLayout, kv_layout
from passes.capture import capture
from passes.dataflow import analyse
from passes.groups import unit_components
from passes.rewrite import RewriteError, apply_plan


def save(compressed: torch.nn.Module, path: str | Path, *, hf: bool = True) -> Path:
    """Write ``compressed`` (what ``ecospa_fx.compress`` returned) to the directory ``path``; with ``hf``
    also a transformers-loadable ``hf/`` copy when a config describes it exactly (``ecospa.json``'s
    ``hf_export`` says what happened). Tied tensors are stored once (``aliases`` names the others); the
    sha256 of each weight file is recorded (``checksums``) and checked on load."""
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
    state, aliases = unique_state(compressed)
    save_file(state, str(out / WEIGHTS))
    hf_record = _write_hf(compressed, out, source) if hf else {"written": None, "reason": "not requested"}
    written = [WEIGHTS, *_hf_files(out, hf_record)]
    _normal_permissions([out / name for name in written])
    plan = {
        "format": FORMAT_VERSION,
        "granularity": report.granularity,
        "sparsity": report.sparsity,
        "removed": [[name, dim, list(idx)] for (name, dim), idx in sorted(report.removed.items())],
        "compensated": list(getattr(compressed, "ecospa_compensated", ())),
        "inputs": source["inputs"],
        "hf_class": source.get("hf_class"),
        "hf_config": source.get("hf_config"),
        "hf_export": hf_record,
        "aliases": aliases,
        "checksums": checksums(out, written),
    }
    layout = getattr(compressed, "ecospa_kv", None)
    if layout is not None:
        plan["kv"] = layout.to_json()
    (out / PLAN).write_text(json.dumps(plan, indent=1))
    return out


def unique_state(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``module``'s state with each tensor once (safetensors refuses shared tensors): a name whose tensor
    is the same view of the same storage as an earlier name's (a tied embedding and LM head) is returned
    in ``aliases`` (``{name: stored name}``) instead of being stored again."""
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in module.state_dict().items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen.setdefault(key, name)
        state[name] = t.contiguous().clone()
    return state, aliases


def _hf_files(out: Path, record: dict[str, Any]) -> list[str]:
    """The files of the transformers copy that get checksums: its config and weights."""
    if not record.get("written"):
        return []
    folder = out / record["written"]
    files = [p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json")]
    return sorted(str(p.relative_to(out)) for p in files)


def _normal_permissions(paths: list[Path]) -> None:
    """safetensors writes its files owner-only (0600): give them the mode a plain ``open`` would (0666
    less the umask, typically 0644)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for path in paths:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o666 & ~mask)


def annotate(path: str | Path, **fields: Any) -> None:
    """Add ``fields`` to a saved artifact's ``ecospa.json`` (e.g. where the source model lives)."""
    plan = read_plan(Path(path))
    plan.update(fields)
    (Path(path) / PLAN).write_text(json.dumps(plan, indent=1))


def hf_export_info(path: str | Path) -> dict[str, Any]:
    """The ``hf_export`` record of a saved artifact (``written``: the folder or None, ``reason``)."""
    plan = read_plan(Path(path))
    return plan.get("hf_export") or {"written": None, "reason": "artifact written before hf export existed"}


def check_artifact(path: str | Path) -> dict[str, Any]:
    """Check an artifact without building the model: ``ecospa.json`` is valid, every weight file matches
    its recorded sha256 and ``model.safetensors`` has a readable header. ``checksums``: "verified", or
    "absent" for artifacts written before checksums were recorded (an ``EcospaWarning`` says so)."""
    root = Path(path)
    if not (root / WEIGHTS).is_file():
        raise InputError(f"{root} is not a complete ecospa_fx artifact: {WEIGHTS} is missing; write it again")
    plan = read_plan(root)
    verified = verify_checksums(root, plan)
    stored = stored_shapes(root / WEIGHTS)
    _check_aliases(plan, stored, root)
    return {"checksums": "verified" if verified else "absent", "tensors": len(stored)}


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


def random_inputs(specs: list[dict[str, Any]], vocab: Any, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs shaped as the saved specs: token ids in ``[0, vocab)`` (``[0, 2)`` without a usable
    vocabulary size), or standard-normal floats."""
    vocab = vocab if isinstance(vocab, int) and vocab >= 1 else 2
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
    kv: bool | None = None,
) -> torch.fx.GraphModule:
    """Rebuild a saved compressed model. ``model``: a freshly built instance of the original
    architecture (any weights); optional for Hugging Face models, whose config was saved.
    ``example_inputs`` (default: the saved shapes) and ``dynamic_shapes`` are the capture's: the result
    runs on inputs of those shapes (static capture) or of any batch/seq (dynamic).

    ``kv``: the form of a Hugging Face causal LM. ``True`` rebuilds it with its KV cache (the module
    ``ecospa_fx.generate`` runs, dynamic shapes), ``False`` as a plain ``(input_ids,) -> logits``
    forward; ``None`` (default) as it was saved. The plan is the same either way: one is the other with
    the cache as extra inputs and outputs.

    Before anything is built, ``ecospa.json`` is checked, the weights are compared with their recorded
    sha256 and the architecture's shapes (less the removed channels) with the stored ones: a damaged or
    edited artifact is an ``InputError`` naming the file."""
    root = Path(path)
    if not (root / PLAN).is_file() or not (root / WEIGHTS).is_file():
        raise InputError(f"{root} is not an ecospa_fx artifact (expected {PLAN} and {WEIGHTS})")
    plan = read_plan(root)
    verify_checksums(root, plan, (WEIGHTS,))
    stored = stored_shapes(root / WEIGHTS)
    _check_aliases(plan, stored, root)
    saved_kv = bool(plan.get("kv"))
    want_kv = saved_kv if kv is None else bool(kv)
    rename = _renamer(saved_kv, want_kv, plan, root)
    model = _architecture(plan, model, stored, root)
    inputs = tuple(example_inputs) if example_inputs is not None else tuple(_example(s) for s in plan["inputs"])
    target = None
    if want_kv:
        gm, analysis, target = _capture_kv(model, inputs)
    else:
        if saved_kv or recurrent_cache_layers(model):  # the plain form returns logits only
            model.config.get_text_config(decoder=True).use_cache = False
        gm = capture(model, inputs[:1] if saved_kv and example_inputs is None else inputs, dynamic_shapes)
        analysis = analyse(gm)
    removed = [[rename(name), dim, idx] for name, dim, idx in plan["removed"]]
    keep = _keep_mask(analysis.facts, removed, plan["granularity"], root / PLAN)
    try:
        apply_plan(gm, analysis, keep)
    except RewriteError as err:
        raise damaged(root / PLAN, f"holds a plan this architecture cannot take ({one_line(err)})") from None
    _restore_output_biases(gm, plan.get("compensated", []), root / PLAN)
    tensors = {rename(k): v for k, v in read_tensors(root / WEIGHTS).items()}
    _load_tensors(gm, tensors, {rename(a): rename(n) for a, n in (plan.get("aliases") or {}).items()})
    if want_kv:
        gm.ecospa_kv = KVLayout.from_json(plan["kv"]) if saved_kv else kv_layout(analysis, keep, target)
    return gm


def _renamer(saved_kv: bool, want_kv: bool, plan: dict[str, Any], root: Path):
    """Parameter names from the saved form to the wanted one (the KV form holds the model as ``model``)."""
    if saved_kv == want_kv:
        return lambda name: name
    if not plan.get("hf_class"):
        raise InputError(f"{root}: only an artifact of a Hugging Face causal LM can be loaded with kv={want_kv}")
    if plan.get("compensated"):
        raise InputError(f"{root}: a compensated artifact loads only in the form it was saved (kv={saved_kv})")
    if want_kv:
        return lambda name: KV_PREFIX + name
    return lambda name: name.removeprefix(KV_PREFIX)


def _capture_kv(model: torch.nn.Module, inputs: tuple):
    """The KV form of a causal LM, captured as ``compress`` captures it: (graph, analysis, target)."""
    model = model.model if isinstance(model, KVCacheLM) else model
    model.config.get_text_config(decoder=True).use_cache = True
    if not is_cached_causal_lm(model):
        raise InputError(f"{type(model).__name__} is not a causal LM that generates: it has no KV form")
    target = CaptureTarget.of(model, inputs[:1], None, None)
    with target.context():
        gm = capture(target.module, target.inputs, target.dynamic_shapes, guards=False)
    return gm, analyse(gm, target.state), target


def _check_aliases(plan: dict[str, Any], stored: dict[str, list[int]], root: Path) -> None:
    for alias, name in (plan.get("aliases") or {}).items():
        if name not in stored or alias in stored:
            raise damaged(root / PLAN, f"records {alias} as an alias of {name}, which {WEIGHTS} does not match")


def _architecture(
    plan: dict[str, Any], model: torch.nn.Module | None, stored: dict[str, list[int]], root: Path
) -> torch.nn.Module:
    """The caller's ``model`` (its shapes checked against the stored tensors) or the Hugging Face model
    ``ecospa.json`` describes, checked on the meta device before its weights are allocated."""
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = KVCacheLM(model) if plan.get("kv") and not isinstance(model, KVCacheLM) else model
        problem = architecture_problem(named.state_dict(), stored, plan, complete=False)
        if problem:
            raise InputError(f"artifact {root} does not match the architecture of the model passed: {problem}")
        return model
    cls, config = hf_config(plan, root)
    if cls is None:
        raise InputError("this artifact was not made from a Hugging Face model: pass model=<fresh instance>")
    meta = _build(cls, config, root, meta=True)
    state = (KVCacheLM(meta) if plan.get("kv") else meta).state_dict()  # saved under the KV form's names
    problem = architecture_problem(state, stored, plan, complete=True)
    problem = problem or buffer_problem(meta, set(state), (root / WEIGHTS).stat().st_size)
    if problem:
        raise damaged(root / PLAN, f"describes a {cls.__name__} that does not match {WEIGHTS}: {problem}")
    return _build(cls, config, root, meta=False).eval()


def _build(cls: type, config: Any, root: Path, meta: bool) -> torch.nn.Module:
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return cls(config)
    except Exception as err:  # a config transformers accepts but the model cannot be built from
        problem = f"has an 'hf_config' {cls.__name__} cannot be built from ({one_line(err)})"
        raise damaged(root / PLAN, problem) from None


def _load_tensors(gm: torch.fx.GraphModule, state: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """Copy the stored tensors into ``gm``: parameters, persistent buffers and any non-persistent buffer
    the file holds (a copied GraphModule saves those of its root), then re-tie aliased parameters."""
    for alias, name in aliases.items():
        state[alias] = state[name]
    targets = dict(gm.named_parameters(remove_duplicate=False))
    targets.update(gm.named_buffers(remove_duplicate=False))
    missing = [k for k in gm.state_dict() if k not in state]
    unexpected = [k for k in state if k not in targets]
    if missing or unexpected:
        raise InputError(
            f"artifact does not match the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    wrong = [k for k, t in state.items() if t.shape != targets[k].shape]
    if wrong:
        k = wrong[0]
        raise InputError(
            f"artifact does not match the architecture: {k} is stored as {list(state[k].shape)}, the "
            f"rebuilt model has {list(targets[k].shape)}"
        )
    with torch.no_grad():
        for k, t in state.items():
            targets[k].copy_(t)
    _retie(gm, aliases)


def _retie(gm: torch.fx.GraphModule, aliases: dict[str, str]) -> None:
    """Make each aliased parameter the very Parameter it was tied to when saved."""
    for alias, name in aliases.items():
        owner_path, _, attr = alias.rpartition(".")
        owner = gm.get_submodule(owner_path)
        current, tied = getattr(owner, attr, None), gm.get_parameter(name) if _is_parameter(gm, name) else None
        if isinstance(current, torch.nn.Parameter) and tied is not None and current is not tied:
            setattr(owner, attr, tied)


def _is_parameter(gm: torch.nn.Module, name: str) -> bool:
    try:
        gm.get_parameter(name)
    except AttributeError:
        return False
    return True


def _restore_output_biases(gm: torch.fx.GraphModule, nodes: list[str], plan_path: Path) -> None:
    """Recreate the bias parameters that ``compress(compensate=True)`` folded into these linears (zeros
    here; the saved values are copied in afterwards)."""
    from passes.importance.compensate import add_output_biases

    graph_nodes = {n.name: n for n in gm.graph.nodes}
    missing = [name for name in nodes if name not in graph_nodes]
    if missing:
        raise InputError(f"artifact compensated linears {missing[:3]} that this capture of the model lacks")
    zeros = {}
    for name in nodes:
        args = graph_nodes[name].args
        if len(args) < 2 or not isinstance(args[1], torch.fx.Node) or args[1].op != "get_attr":
            raise damaged(plan_path, f"lists {name} as a compensated linear, which it is not in this capture")
        weight = gm.get_parameter(args[1].target)
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


def _keep_mask(facts, removed: list, granularity: str, plan_path: Path) -> np.ndarray:
    """Keep mask over all channels: a unit goes when any of its channels was recorded as removed."""
    keep = np.ones(facts.n_channels, dtype=bool)
    spaces = {(s.param, s.dim): s for s in facts.spaces if not s.is_virtual}
    for name, dim, idx in removed:
        space = spaces.get((name, dim))
        if space is None:
            raise InputError(f"{plan_path} removes channels of {name}[{dim}], which this architecture lacks")
        if idx and max(idx) >= space.size:
            raise damaged(plan_path, f"removes channel {max(idx)} of {name}[{dim}], which has {space.size}")
        keep[space.offset + np.asarray(idx, dtype=np.int64)] = False
    comp = unit_components(facts, granularity)
    gone = np.unique(comp[~keep])
    keep[np.isin(comp, gone)] = False
    return keep
