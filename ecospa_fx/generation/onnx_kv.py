"""ONNX for generation: a compressed KV module written with past/present inputs and outputs.

``export_kv_onnx(compressed, path)`` re-captures the KV form with batch, sequence and past length
dynamic, translates it (``ecospa_fx.export``'s translator: opset 24, fallback 18), names the tensors as
onnxruntime-genai does (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key``
/ ``.value`` -> ``logits``, ``present.{i}.key`` / ``.value``; axes ``batch_size``, ``sequence_length``,
``past_sequence_length``, ``total_sequence_length``), and checks onnxruntime against PyTorch on a prefill
(past length 0) and on a decode step (one token after a past), at batch sizes other than the capture's.

``quantize_int8(src, dst)`` applies onnxruntime's dynamic int8 quantization (weights int8, activations
quantized per call) to such a file; its quality is reported as token agreement, not bitwise parity.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ecospa_fx.errors import InputError
from ecospa_fx.export import (
    ExportError,
    ParityError,
    _check_model,
    _describe,
    _parity,
    _translate,
    check_writable,
    quiet_exporter,
)
from ecospa_fx.generation.backends import PAST_NAME, PRESENT_NAME, kv_names
from passes.verify import _as_float64, _float64, max_abs_diff, max_abs_value

AXES = {"batch": "batch_size", "seq": "sequence_length", "past": "past_sequence_length"}
TOTAL = "total_sequence_length"


@dataclass(frozen=True)
class KVExportResult:
    path: Path
    opset: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def export_kv_onnx(
    compressed: torch.nn.Module,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    check: bool = True,
    atol: float | None = None,
) -> KVExportResult:
    """Write the KV form of ``compressed`` (what ``compress`` returned for a cached causal LM) to ``path``.
    ``atol``: the parity bound; default ``1e-4 + 1e-5 * max|output|`` per checked input set (float32
    rounding grows with depth and magnitude: a 30-layer model's keys differ by ~1e-4 in onnxruntime), widened
    where that fails to twice PyTorch's own float32 error on those inputs (``_rounding_bound``; the result's
    ``notes`` say where)."""
    layout = getattr(compressed, "ecospa_kv", None)
    if layout is None:
        raise InputError(
            "export_kv_onnx needs a compressed causal LM with a KV cache (compress it with use_cache=True)"
        )
    path = check_writable(path)
    example = _inputs(compressed, batch=2, seq=3, past=4)
    notes: list[str] = []
    with quiet_exporter():
        program = _capture(compressed, example)
        onnx_program, used = _translate(program, opset, notes)
        _name(onnx_program, len(example) - 3, layout)
        onnx_program.save(str(path))
    if not check:
        return KVExportResult(path, used, notes=tuple(notes))
    _check_model(path)
    names = ["logits", *kv_names(len(example) - 3, PRESENT_NAME)]
    diffs: dict[str, float] = {}
    for batch, seq, past in ((1, 5, 0), (3, 1, 6), (2, 4, 3)):
        inputs = _inputs(compressed, batch, seq, past)
        with torch.no_grad():
            reference = compressed(*inputs)
        bound = atol if atol is not None else 1e-4 + 1e-5 * max_abs_value(reference)
        try:
            found = _parity(path, compressed, [inputs], reference, names, bound)
        except ParityError as err:
            if atol is not None or not err.diff <= (wider := _rounding_bound(compressed, inputs, reference, bound)):
                raise
            found = _parity(path, compressed, [inputs], reference, names, wider)
            notes.append(
                f"{err.output}: onnxruntime differs from PyTorch by {err.diff:.2e} on inputs {batch}x{seq} "
                f"(past {past}), within twice PyTorch's own float32 rounding there ({wider / 2:.2e} from float64)"
            )
        for name, diff in found.items():
            diffs[name] = max(diffs.get(name, 0.0), diff)
    return KVExportResult(path, used, {"logits": diffs["logits"], "present": _max_present(diffs)}, tuple(notes))


def _rounding_bound(compressed, inputs: tuple, reference, base: float) -> float:
    """Twice PyTorch's own float32 rounding error on ``inputs`` (its distance to the same graph run in
    float64), or ``base`` where that is larger or the graph cannot run in float64. Two float32 runtimes of
    one deep model differ by up to the sum of their rounding errors; measured on SmolLM2 after a Fisher plan
    (1x5 prefill): PyTorch float32 vs float64 5.0e-3 on the logits, onnxruntime vs PyTorch 9.6e-4,
    onnxruntime vs float64 4.0e-3. Only computed when the plain bound fails (a float64 copy of the model)."""
    try:
        with torch.no_grad():
            exact = _as_float64(compressed)(*_float64(inputs))
    except RuntimeError:
        return base
    return max(base, 2.0 * max_abs_diff(reference, exact))


def _max_present(diffs: dict[str, float]) -> float:
    return max((v for k, v in diffs.items() if k != "logits"), default=0.0)


def _inputs(compressed, batch: int, seq: int, past: int) -> tuple:
    """Seeded KV-form inputs whose cache is the model's own: a prefill of ``past`` random tokens gives the
    past tensors (random caches make a deep model ill-conditioned: a 30-layer LM's logits then differ by
    1e-2 between two correct runtimes)."""
    layout = compressed.ecospa_kv
    seed = batch * 100 + seq * 10 + past
    ids, mask, positions, *cache = layout.random_inputs(_vocab(compressed), batch, seq + past, 0, seed=seed)
    if past:
        with torch.no_grad():
            cache = list(compressed(ids[:, :past], mask[:, :past], positions[:, :past], *cache)[1:])
    return (ids[:, past:], mask, positions[:, past:].contiguous(), *cache)


def _vocab(compressed) -> int:
    """The number of rows of the token table (the parameter an ``embedding`` reads)."""
    from ecospa_fx.generation.target import embedding_name

    return int(compressed.get_parameter(embedding_name(compressed)).shape[0])


def _capture(compressed, example: tuple):
    import torch.fx.experimental._config as fx_config

    auto = torch.export.Dim.AUTO
    shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, *({0: auto, 2: auto} for _ in example[3:]))
    try:
        with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
            return torch.export.export(compressed, example, dynamic_shapes=shapes, strict=False)
    except Exception as err:
        raise ExportError(f"torch.export could not re-capture the KV model: {_describe(err)}") from err


def _name(onnx_program, n_past: int, layout) -> None:
    """Tensor names and axis names as onnxruntime-genai expects; the cache layout in the metadata."""
    import onnx_ir as ir

    graph = onnx_program.model.graph
    input_names = ["input_ids", "attention_mask", "position_ids", *kv_names(n_past, PAST_NAME)]
    for value, name in zip(graph.inputs, input_names, strict=True):
        value.name = name
    for value, name in zip(graph.outputs, ["logits", *kv_names(n_past, PRESENT_NAME)], strict=True):
        value.name = name
    mapping: dict[str, str] = {}
    inputs = list(graph.inputs)

    def symbol(value, axis):
        dim = value.shape[axis] if value.shape is not None else None
        return dim.value if isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str) else None

    named = [(inputs[0], 0, AXES["batch"]), (inputs[0], 1, AXES["seq"]), (inputs[1], 0, AXES["batch"])]
    for value, axis, name in [*named, (inputs[1], 1, TOTAL), (inputs[2], 0, AXES["batch"])]:
        if symbol(value, axis):
            mapping.setdefault(symbol(value, axis), name)
    for value in inputs[3:]:
        if symbol(value, 2):
            mapping.setdefault(symbol(value, 2), AXES["past"])
    onnx_program.rename_axes(mapping)
    onnx_program.model.metadata_props["ecospa_kv"] = json.dumps(layout.to_json())


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """onnxruntime dynamic int8 quantization of ``src`` written to ``dst``: MatMul/Gemm weights to int8;
    attention stays float (onnxruntime's ``QAttention`` rejects the ONNX ``Attention`` node's attributes)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = check_writable(dst)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
    try:
        with quiet_exporter():
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)
    return dst


def token_agreement(reference: str | os.PathLike, candidate: str | os.PathLike, vocab: int, prompts: int = 8) -> float:
    """Top-1 agreement of ``candidate`` with ``reference`` (two KV ONNX files, e.g. int8 and fp32) over a
    fixed set of seeded prompts: the reference continues each 16-token prompt greedily by 16 tokens, then
    both read the whole sequence at once and the fraction of positions whose argmax agrees is returned."""
    from ecospa_fx.generation.backends import OrtStepper
    from ecospa_fx.generation.decode import generate

    ref, cand = OrtStepper(Path(reference)), OrtStepper(Path(candidate))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (prompts, 16), generator=gen)
    sequence = generate(ref, ids, 16, eos_token_id=[])
    mask = torch.ones_like(sequence)
    positions = torch.arange(sequence.shape[1]).expand_as(sequence).contiguous()
    top = [s.step(sequence, mask, positions, s.empty_past(prompts))[0].argmax(-1) for s in (ref, cand)]
    return float((top[0] == top[1]).float().mean())


GENAI_CONFIG = "genai_config.json"


def genai_problem(layout) -> str:
    """Why onnxruntime-genai cannot run this cache, or "": genai allocates one ``[batch, kv_heads, length,
    head_size]`` cache shape for every layer, keys and values alike."""
    widths = set(layout.shapes)
    if len(widths) > 1:
        return (
            "the compressed cache widths (kv_heads, head_dim) differ across layers or between K and V: "
            f"{sorted(widths)}"
        )
    return ""


def write_genai_folder(compressed, onnx_path: str | os.PathLike, out: str | os.PathLike, config, tokenizer) -> Path:
    """A folder onnxruntime-genai runs: the KV ONNX file as ``model.onnx``, ``genai_config.json`` with the
    compressed head count and head size, and the tokenizer. ``config`` is the source model's Hugging Face
    config (positions, vocabulary, query heads per KV head). Raises ``InputError`` with ``genai_problem``."""
    import shutil

    layout = compressed.ecospa_kv
    problem = genai_problem(layout)
    if problem:
        raise InputError(f"no onnxruntime-genai folder: {problem}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, out / "model.onnx")
    tokenizer.save_pretrained(str(out))
    (out / GENAI_CONFIG).write_text(json.dumps(_genai_config(layout, config), indent=1))
    return out


def _genai_config(layout, config) -> dict:
    text = config.get_text_config(decoder=True)
    kv_heads, head_size = layout.shapes[0]
    dense_kv, _ = layout.dense_shapes[0]
    q_per_kv = text.num_attention_heads // dense_kv
    eos = list(layout.eos_token_id) or [getattr(text, "eos_token_id", 0) or 0]
    positions = getattr(text, "max_position_embeddings", None) or 2048
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": head_size,
        "hidden_size": text.hidden_size,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": kv_heads * q_per_kv,
        "num_hidden_layers": layout.n_layers,
        "num_key_value_heads": kv_heads,
    }
    model = {
        "bos_token_id": getattr(text, "bos_token_id", None) or 0,
        "context_length": positions,
        "decoder": decoder,
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": getattr(text, "pad_token_id", None) or eos[0],
        "type": "llama",
        "vocab_size": text.vocab_size,
    }
    search = {"do_sample": False, "max_length": positions, "num_beams": 1, "past_present_share_buffer": False}
    return {"model": model, "search": {**search, "top_k": 1, "top_p": 1.0, "temperature": 1.0}}
