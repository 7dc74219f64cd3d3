"""Evaluation protocols of ``ecospa-fx eval`` (fixed, so numbers from different runs compare).

Perplexity (causal LMs). The text file is read as UTF-8 and tokenized in one piece without special tokens;
the first ``max_tokens`` ids are kept. Windows of exactly ``seq_len`` tokens start at 0, ``stride``,
``2 * stride``, ... while they fit (tokens after the last full window are not scored). The first window
scores its tokens 2..seq_len (each predicted from the ones before it); every later window scores only its
last ``min(stride, seq_len - 1)`` tokens, so no token is scored twice and each has at least
``seq_len - stride`` tokens of context. Perplexity = exp(mean negative log-likelihood over the scored
tokens). ``stride == seq_len`` (the default) gives disjoint windows, whose first tokens are not scored; a
smaller stride gives more context per scored token and costs more windows.

Embedding fidelity (encoders, against their dense source). The same token stream is cut into consecutive
chunks of ``seq_len`` tokens (at most ``max_tokens`` tokens, whole batches only); a chunk's embedding is the
mean of the model's last hidden state over its tokens. Reported: the mean and minimum cosine between the
compressed and the dense embedding of each chunk, and top-1 neighbour agreement (the fraction of chunks
whose nearest other chunk, by cosine, is the same for both models).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from ecospa_fx.errors import InputError

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class Protocol:
    seq_len: int = 256
    stride: int | None = None  # None: seq_len (disjoint windows)
    max_tokens: int = 16384
    batch: int = 4  # chunks per forward pass (fidelity)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise InputError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise InputError(f"--stride must be in [1, --seq-len={self.seq_len}], got {self.stride}")
        if self.max_tokens < self.seq_len:
            raise InputError(f"--max-tokens ({self.max_tokens}) must be at least --seq-len ({self.seq_len})")
        if self.batch < 1:
            raise InputError(f"--batch must be positive, got {self.batch}")

    @property
    def step(self) -> int:
        return self.stride or self.seq_len


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float
    tokens_scored: int
    windows: int


@dataclass(frozen=True)
class Fidelity:
    cosine_mean: float
    cosine_min: float
    top1_agreement: float
    chunks: int


@dataclass(frozen=True)
class Flags:
    """The command-line flags a message about the text names: ``eval`` reads ``--text`` in windows of
    ``--seq-len``; ``compress`` reads ``--calibration`` in rows of ``--seq``."""

    text: str = "--text"
    seq_len: str = "--seq-len"


EVAL_FLAGS, CALIBRATION_FLAGS = Flags(), Flags(text="--calibration", seq_len="--seq")


def read_tokens(path: Path, tokenizer, protocol: Protocol, flags: Flags = EVAL_FLAGS) -> torch.Tensor:
    """The first ``max_tokens`` token ids of a UTF-8 text file (no special tokens); errors name ``flags``."""
    if not path.is_file():
        raise InputError(f"{path} is not a file: {flags.text} takes a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text: {flags.text} takes a UTF-8 text file") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: protocol.max_tokens]
    if len(ids) < protocol.seq_len:
        raise InputError(
            f"{path} has {len(ids)} tokens, fewer than {flags.seq_len} {protocol.seq_len}: use a longer "
            f"text or a smaller {flags.seq_len}"
        )
    return torch.tensor(ids, dtype=torch.long)


def windows(n_tokens: int, protocol: Protocol) -> list[tuple[int, int]]:
    """(start, first scored position inside the window) for every window of the perplexity protocol."""
    starts = range(0, n_tokens - protocol.seq_len + 1, protocol.step)
    return [(s, 1 if i == 0 else max(protocol.seq_len - protocol.step, 1)) for i, s in enumerate(starts)]


def perplexity(model, ids: torch.Tensor, protocol: Protocol, progress: Progress | None = None) -> Perplexity:
    """Perplexity of ``model`` (called as ``model(input_ids)``, returning logits) under ``protocol``."""
    plan = windows(len(ids), protocol)
    total_nll, scored = 0.0, 0
    with torch.no_grad():
        for k, (start, first) in enumerate(plan):
            window = ids[start : start + protocol.seq_len].unsqueeze(0)
            logits = _logits(model(window))[0, first - 1 : -1].double()
            targets = window[0, first:]
            total_nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            scored += len(targets)
            if progress:
                progress(k + 1, len(plan))
    nll = total_nll / scored
    return Perplexity(math.exp(nll), nll, scored, len(plan))


def chunks(ids: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """``[n, seq_len]`` chunks for the fidelity protocol (whole batches, at least two chunks)."""
    n = len(ids) // protocol.seq_len // protocol.batch * protocol.batch
    if n < 2:
        raise InputError(
            f"the text gives {len(ids) // protocol.seq_len} chunks of {protocol.seq_len} tokens; "
            "fidelity needs two full batches of chunks or more: use a longer text, a smaller "
            "--seq-len or --batch 1"
        )
    return ids[: n * protocol.seq_len].view(n, protocol.seq_len)


def embeddings(model, data: torch.Tensor, batch: int, progress: Progress | None = None) -> torch.Tensor:
    """Mean-pooled last hidden state of every chunk, float64 ``[n, hidden]``."""
    out = []
    with torch.no_grad():
        for k in range(0, len(data), batch):
            hidden = _hidden(model(data[k : k + batch]))
            out.append(hidden.double().mean(dim=1))
            if progress:
                progress(min(k + batch, len(data)), len(data))
    return torch.cat(out)


def fidelity(ours: torch.Tensor, dense: torch.Tensor) -> Fidelity:
    """Cosine and top-1 neighbour agreement of two sets of embeddings of the same chunks."""
    cos = torch.nn.functional.cosine_similarity(ours, dense, dim=-1)
    return Fidelity(
        float(cos.mean()), float(cos.min()), float((_nearest(ours) == _nearest(dense)).double().mean()), len(ours)
    )


def _nearest(e: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(e, dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(dim=-1)


def next_token_loss(outputs, batch: tuple) -> torch.Tensor:
    """Causal LM loss (for Fisher scores): the logits at position t predict token t + 1 of ``batch[0]``."""
    logits = _logits(outputs)
    ids = batch[0]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _logits(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return _first_tensor(output, 3)


def _hidden(output) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    return _first_tensor(output, 3)


def _first_tensor(output, ndim: int) -> torch.Tensor:
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.ndim == ndim:
            return leaf
    raise InputError("the model returns no [batch, seq, features] tensor to evaluate")


def as_dict(result: Perplexity | Fidelity) -> dict:
    return asdict(result)
