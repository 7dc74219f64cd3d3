"""Errors users see: each names what is wrong and what to do."""

from __future__ import annotations


class EcospaError(Exception):
    """Base class of every error ecospa_fx raises on purpose."""


class InputError(EcospaError, ValueError):
    """The model, its example inputs or a setting cannot be used as given."""


class CaptureError(EcospaError):
    """torch.export could not trace the model."""


class VerificationError(EcospaError):
    """The compressed model does not match the masked dense model (a bug: please report it)."""


class EcospaWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. an artifact loaded unverified)."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (its lines joined; its type when it has none), at most
    ``limit`` characters."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
