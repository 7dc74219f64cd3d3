"""Pass contract: a pass states what it requires, does one job, and checks what it ensures.

Modelled on onnx-ir's pass infrastructure: ``__call__`` runs ``requires`` -> ``call`` -> ``ensures`` and
returns a ``PassResult``; any failure is re-raised naming the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class PassResult(Generic[T]):
    module: T
    modified: bool


class PassError(Exception):
    """A pass failed; the message starts with the pass name."""


class Pass(Generic[T]):
    name = "pass"

    def requires(self, module: T) -> None:
        """Raise if ``module`` is not something this pass can run on."""

    def call(self, module: T) -> PassResult[T]:
        raise NotImplementedError

    def ensures(self, module: T) -> None:
        """Raise if the result breaks an invariant this pass promises."""

    def __call__(self, module: T) -> PassResult[T]:
        try:
            self.requires(module)
            result = self.call(module)
            self.ensures(result.module)
        except (PassError, ValueError, TypeError):
            raise
        except Exception as err:
            raise PassError(f"{self.name}: {err}") from err
        return result
