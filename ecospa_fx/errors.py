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
