"""What an artifact's files may hold, checked before anything is built or allocated.

- ``read_plan``: ``ecospa.json`` parsed and checked field by field (types, known values, example input shapes
  within sane bounds), so a damaged or edited file is an ``InputError`` naming the file and the field;
- checksums: the sha256 of each weight file, recorded by ``save`` and compared on load and by ``inspect``;
- ``stored_shapes`` / ``read_tensors``: the safetensors header (shapes only, no data) and the tensors, with
  read failures reported as ``InputError`` naming the file;
- ``check_architecture``: the shapes an architecture (built on the meta device, or the caller's module) has
  less the removed channels must equal the stored ones, so a tampered config cannot make ``load`` allocate a
  model far larger than the artifact.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ecospa_fx.errors import EcospaWarning, InputError, one_line

FORMAT_VERSION = 1
WEIGHTS, PLAN, HF_DIR = "model.safetensors", "ecospa.json", "hf"
GRANULARITIES = ("channel", "head")
MAX_INPUT_RANK = 8
MAX_INPUT_ELEMENTS = 1 << 24  # example inputs only drive a capture: 16M elements is far more than needed
MIN_BUFFER_BUDGET = 64 << 20  # bytes of non-saved buffers a rebuilt architecture may hold beyond the file's size
POSITION_KEYS = ("max_position_embeddings", "n_positions")
SIZE_KEYS = ("vocab_size", *POSITION_KEYS)
REWRITE = "write the artifact again (ecospa_fx.save or ecospa-fx compress)"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def damaged(path: Path, what: str) -> InputError:
    """The error for a file of an artifact that is damaged or was edited."""
    return InputError(f"{path} {what}: the artifact is damaged or was edited; {REWRITE}")


# ------------------------------------------------------------------ ecospa.json
def read_plan(root: Path) -> dict[str, Any]:
    """``root / ecospa.json``, parsed and checked (see ``check_plan``)."""
    path = Path(root) / PLAN
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is unreadable ({err}): {REWRITE}") from None
    try:
        plan = json.loads(text)
    except ValueError as err:
        raise damaged(path, f"is not valid JSON ({err})") from None
    check_plan(plan, path)
    return plan


def check_plan(plan: Any, path: Path) -> None:
    """Raise ``InputError`` naming ``path`` and the field when ``plan`` is not what ``save`` writes."""
    if not isinstance(plan, dict):
        raise damaged(path, f"holds a JSON {type(plan).__name__}, not an object")
    if plan.get("format") != FORMAT_VERSION:
        raise InputError(
            f"{path}: unsupported artifact format {plan.get('format')!r} (this ecospa_fx reads format "
            f"{FORMAT_VERSION}); {REWRITE}"
        )
    for check in (_core_problem, _removed_problem, _hf_problem, _inputs_problem, _records_problem):
        problem = check(plan)
        if problem:
            raise damaged(path, f"is invalid: {problem}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _core_problem(plan: dict[str, Any]) -> str:
    if plan.get("granularity") not in GRANULARITIES:
        return f"'granularity' is {plan.get('granularity')!r}, expected one of {list(GRANULARITIES)}"
    sparsity = plan.get("sparsity")
    if sparsity is not None and (not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool)):
        return f"'sparsity' is {sparsity!r}, expected a number"
    if not _is_str_list(plan.get("compensated", [])):
        return "'compensated' must be a list of node names"
    return ""


def _removed_problem(plan: dict[str, Any]) -> str:
    removed = plan.get("removed")
    if not isinstance(removed, list):
        return "'removed' must be a list of [parameter, dim, [indices]]"
    for k, entry in enumerate(removed):
        ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
        ok = ok and _is_int(entry[1]) and entry[1] >= 0 and isinstance(entry[2], list)
        if not ok or not all(_is_int(i) and i >= 0 for i in entry[2]):
            return f"'removed'[{k}] must be [parameter name, dim >= 0, [indices >= 0]], got {str(entry)[:80]}"
    return ""


def _hf_problem(plan: dict[str, Any]) -> str:
    cls, config = plan.get("hf_class"), plan.get("hf_config")
    if cls is None and config is None:
        return ""
    if not isinstance(cls, str) or not cls.isidentifier():
        return f"'hf_class' is {cls!r}, expected a transformers class name"
    if not isinstance(config, dict):
        return "'hf_config' must be a JSON object (the model's config)"
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and not (_is_int(value) and value >= 1):
            return f"'hf_config'.{key} is {value!r}, expected a positive integer"
    return ""


def _inputs_problem(plan: dict[str, Any]) -> str:
    specs = plan.get("inputs")
    if not isinstance(specs, list) or not specs:
        return "'inputs' must be a non-empty list of {shape, dtype}"
    positions = [(plan.get("hf_config") or {}).get(k) for k in POSITION_KEYS]
    limit = next((p for p in positions if p), None)
    for k, spec in enumerate(specs):
        problem = _spec_problem(spec, limit)
        if problem:
            return f"'inputs'[{k}] {problem}"
    return ""


def _spec_problem(spec: Any, positions: int | None) -> str:
    """What is wrong with one example input spec: the shape is bounded so ``load`` never allocates a huge
    example (16M elements at most; token ids no longer than the model's positions)."""
    if not isinstance(spec, dict):
        return "must be an object {shape, dtype}"
    shape, dtype = spec.get("shape"), spec.get("dtype")
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        return f"has dtype {dtype!r}, not a torch dtype name"
    if not isinstance(shape, list) or len(shape) > MAX_INPUT_RANK or not all(_is_int(d) and d >= 0 for d in shape):
        return f"has shape {str(shape)[:80]}, expected at most {MAX_INPUT_RANK} sizes >= 0"
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        return f"has shape {shape}: {math.prod(shape):,} elements, more than the {MAX_INPUT_ELEMENTS:,} allowed"
    token_ids = not getattr(torch, dtype).is_floating_point and len(shape) >= 2
    if token_ids and positions and shape[1] > positions:
        return f"has shape {shape}: {shape[1]} tokens, more than the model's {positions} positions"
    return ""


def _records_problem(plan: dict[str, Any]) -> str:
    aliases = plan.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        return "'aliases' must map tensor names to the stored tensor they share"
    if set(aliases) & set(aliases.values()):
        return "'aliases' must point at stored tensors, not at other aliases"
    checksums = plan.get("checksums", {})
    digests = checksums.values() if isinstance(checksums, dict) else [None]
    if not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in digests):
        return "'checksums' must map file names to sha256 hex digests"
    for key, fields in (("hf_export", ("written", "reason")), ("source", ("path", "gguf_file"))):
        record = plan.get(key)
        if record is not None and not (isinstance(record, dict) and _optional_strings(record, fields)):
            return f"'{key}' must be an object whose {' and '.join(fields)} are strings or null"
    return ""


def _optional_strings(record: dict[str, Any], fields: tuple[str, ...]) -> bool:
    return all(record.get(f) is None or isinstance(record.get(f), str) for f in fields)


def hf_config(plan: dict[str, Any], root: Path):
    """The transformers class and config an artifact records, or (None, None) for a plain module."""
    if not plan.get("hf_class"):
        return None, None
    import transformers

    cls = getattr(transformers, plan["hf_class"], None)
    if not (isinstance(cls, type) and hasattr(cls, "config_class")):
        raise InputError(f"{Path(root) / PLAN}: transformers has no model class {plan['hf_class']}")
    try:
        return cls, cls.config_class.from_dict(plan["hf_config"])
    except Exception as err:  # transformers validates configs with many error types
        raise damaged(Path(root) / PLAN, f"has an 'hf_config' {cls.__name__} rejects ({one_line(err)})") from None


# ------------------------------------------------------------------ weight files
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(root: Path, names: list[str]) -> dict[str, str]:
    """``{name: sha256}`` of the files ``names`` (relative to ``root``)."""
    return {name: sha256_of(Path(root) / name) for name in names}


def verify_checksums(root: Path, plan: dict[str, Any], names: tuple[str, ...] | None = None) -> bool:
    """Compare the files (``names``, default every recorded one) with the sha256 recorded at save time.
    False, with an ``EcospaWarning``, when the artifact records none (written before checksums existed)."""
    recorded = plan.get("checksums") or {}
    if not recorded:
        warnings.warn(
            f"{Path(root) / PLAN} records no checksums (written before ecospa_fx recorded them): its weights "
            "are not verified; write the artifact again to add them",
            EcospaWarning,
            stacklevel=3,
        )
        return False
    for name in names if names is not None else tuple(recorded):
        path = Path(root) / name
        if name not in recorded:
            raise damaged(Path(root) / PLAN, f"records no checksum of {name}")
        if not path.is_file():
            raise damaged(path, "is missing")
        if sha256_of(path) != recorded[name]:
            raise damaged(path, f"differs from the sha256 recorded in {PLAN} at save time (truncated or overwritten?)")
    return True


def stored_shapes(path: Path) -> dict[str, list[int]]:
    """The tensor shapes a safetensors file records (its header only: nothing is allocated)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise damaged(Path(path), f"cannot be read as safetensors ({one_line(err)})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise damaged(Path(path), f"cannot be read as safetensors ({one_line(err)})") from None


# ------------------------------------------------------------------ architecture vs stored tensors
def architecture_problem(
    state: Mapping[str, torch.Tensor], stored: dict[str, list[int]], plan: dict[str, Any], *, complete: bool
) -> str:
    """What is wrong, or "": every tensor of ``state`` (an architecture's dense state dict; meta tensors
    are enough) must be stored under its name or alias, shaped as the dense tensor less the removed
    channels; with ``complete``, none may be missing from the file."""
    removed = {(n, d): len(set(idx)) for n, d, idx in plan["removed"]}
    aliases = plan.get("aliases") or {}
    missing, wrong = [], []
    for name, tensor in state.items():
        key = aliases.get(name, name)
        if key not in stored:
            missing.append(name)
            continue
        dense = list(tensor.shape)
        want = [n - removed.get((name, d), removed.get((key, d), 0)) for d, n in enumerate(dense)]
        if want != stored[key]:
            wrong.append(f"{name} is stored as {stored[key]} but the architecture gives {dense} less removed = {want}")
    if wrong:
        return f"{wrong[0]} ({len(wrong)} such tensors)"
    if complete and missing:
        return f"the stored tensors lack {missing[:3]} ({len(missing)} tensors)"
    return ""


def buffer_problem(model: torch.nn.Module, saved: set[str], file_bytes: int) -> str:
    """What is wrong, or "": buffers the artifact does not store (e.g. rotary tables) are rebuilt from the
    config, which must not make them far larger than the artifact itself."""
    extra = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in saved)
    budget = max(MIN_BUFFER_BUDGET, file_bytes)
    return f"its buffers would take {extra:,} bytes, more than the {budget:,} allowed" if extra > budget else ""
