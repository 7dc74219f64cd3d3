"""ecospa_fx: coupled structured compression of transformers as a torch.export / FX pass.

The public names are imported on first use (PEP 562), so ``import ecospa_fx.cli`` (``ecospa-fx --help``,
``--version``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compress": "ecospa_fx.api",
    "discover": "ecospa_fx.api",
    "load": "ecospa_fx.artifact",
    "save": "ecospa_fx.artifact",
    "CompressConfig": "ecospa_fx.config",
    "CaptureError": "ecospa_fx.errors",
    "EcospaError": "ecospa_fx.errors",
    "EcospaWarning": "ecospa_fx.errors",
    "InputError": "ecospa_fx.errors",
    "VerificationError": "ecospa_fx.errors",
    "ExportError": "ecospa_fx.export",
    "ExportResult": "ecospa_fx.export",
    "ParityError": "ecospa_fx.export",
    "export_onnx": "ecospa_fx.export",
    "token_dynamic_shapes": "ecospa_fx.export",
    "generate": "ecospa_fx.generation.decode",
    "export_kv_onnx": "ecospa_fx.generation.onnx_kv",
    "quantize_int8": "ecospa_fx.generation.onnx_kv",
    "Group": "ecospa_fx.report",
    "Member": "ecospa_fx.report",
    "Report": "ecospa_fx.report",
    "Skipped": "ecospa_fx.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ecospa_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
