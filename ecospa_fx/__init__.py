"""ecospa_fx: coupled structured compression of transformers as a torch.export / FX pass."""

from ecospa_fx.api import compress, discover
from ecospa_fx.artifact import load, save
from ecospa_fx.config import CompressConfig
from ecospa_fx.errors import CaptureError, EcospaError, EcospaWarning, InputError, VerificationError
from ecospa_fx.export import ExportError, ExportResult, ParityError, export_onnx, token_dynamic_shapes
from ecospa_fx.report import Group, Member, Report, Skipped

__all__ = [
    "CaptureError",
    "CompressConfig",
    "EcospaError",
    "EcospaWarning",
    "ExportError",
    "ExportResult",
    "Group",
    "InputError",
    "Member",
    "ParityError",
    "Report",
    "Skipped",
    "VerificationError",
    "compress",
    "discover",
    "export_onnx",
    "load",
    "save",
    "token_dynamic_shapes",
]
__version__ = "0.1.0"
