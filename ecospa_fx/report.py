"""The report contract: what was coupled, what was removed, what was skipped and why.

``Report.groups`` lists every coupled group that was planned; each ``Group`` has ``kind`` and ``members``;
each ``Member`` names a parameter of the *original* model (``param``), a dimension (``dim``) and the indices
removed along it (``removed``, in the original index space). Zeroing all of them in the dense model gives
the compressed model's function (the mask oracle).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

# the kinds of prunable groups: Q/K channels, V/O channels, FFN channels, latent ranks (multi-head latent
# attention's normalised q/kv bottlenecks), whole attention heads (head granularity)
KINDS = ("qk", "vo", "ffn", "latent", "head")


@dataclass(frozen=True)
class Member:
    param: str
    dim: int
    size: int
    removed: tuple[int, ...]

    @property
    def kept(self) -> int:
        return self.size - len(self.removed)


@dataclass(frozen=True)
class Group:
    kind: str
    members: tuple[Member, ...]
    units: int
    units_removed: int
    sites: tuple[str, ...] = ()  # non-parameter operands gathered alongside (rotary cos/sin, masks)
    note: str = ""  # why nothing was removed although the group was planned at a nonzero sparsity

    @property
    def layer(self) -> str:
        """Display only: the longest common module prefix of the members' names."""
        prefix = os.path.commonprefix([m.param for m in self.members]).rstrip(".")
        return prefix.rsplit(".", 1)[0] if "." in prefix else prefix

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(m.param for m in self.members)


@dataclass(frozen=True)
class Skipped:
    kind: str
    params: tuple[str, ...]
    reasons: tuple[str, ...]


@dataclass
class Report:
    sparsity: float
    granularity: str
    groups: list[Group] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    max_abs_diff: float | None = None
    compensated: tuple[str, ...] = ()  # weights whose output bias absorbed removed channels' means
    refit: tuple[str, ...] = ()  # weights whose kept columns were refit on calibration data
    not_refit: tuple[str, ...] = ()  # weights the refit left as they were (no refit beat that on held-out data)

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def count(self, kind: str) -> int:
        return sum(g.kind == kind for g in self.groups)

    @property
    def removed(self) -> dict[tuple[str, int], tuple[int, ...]]:
        """(param, dim) -> removed indices, merged over groups."""
        out: dict[tuple[str, int], set[int]] = {}
        for g in self.groups:
            for m in g.members:
                out.setdefault((m.param, m.dim), set()).update(m.removed)
        return {k: tuple(sorted(v)) for k, v in out.items() if v}

    def table(self) -> Table:
        table = Table(title=f"ecospa_fx: {self.granularity} granularity, sparsity {self.sparsity:g}")
        for col in ("layer", "kind", "groups", "units kept", "params"):
            table.add_column(col)
        rows: dict[tuple[str, str], list[Group]] = {}
        for g in self.groups:
            rows.setdefault((g.layer, g.kind), []).append(g)
        for (layer, kind), gs in rows.items():
            units = sum(g.units for g in gs)
            kept = units - sum(g.units_removed for g in gs)
            widths = ", ".join(
                sorted({f"{_short(m.param)}[{m.dim}] {m.size}->{m.kept}" for g in gs for m in g.members})
            )
            table.add_row(layer or "-", kind, str(len(gs)), f"{kept}/{units}", widths)
        return table

    def summary(self) -> str:
        if self.groups:
            buf = io.StringIO()
            console = Console(file=buf, width=140, force_terminal=False, color_system=None)
            console.print(self.table())
            kinds = {k: self.count(k) for k in KINDS if self.count(k)}
            lines = [buf.getvalue().rstrip(), f"groups: {kinds}"]
        else:
            lines = [
                f"ecospa_fx: {self.granularity} granularity, sparsity {self.sparsity:g}",
                f"nothing to compress: {self.nothing_reason()}",
            ]
        if self.params_before:
            ratio = self.params_after / self.params_before
            lines.append(f"parameters: {self.params_before:,} -> {self.params_after:,} ({ratio:.3f}x)")
        if self.max_abs_diff is not None:
            lines.append(f"verified against the masked dense model: max abs diff {self.max_abs_diff:.2e}")
        if self.refit:
            shown = ", ".join(self.refit[:4]) + (" ..." if len(self.refit) > 4 else "")
            lines.append(f"refit on calibration data: {len(self.refit)} weights ({shown})")
        if self.not_refit:
            lines.append(
                f"not refit: {len(self.not_refit)} weights (no refit beat the plain removal on held-out tokens)"
            )
        if self.compensated:
            shown = ", ".join(self.compensated[:4]) + (" ..." if len(self.compensated) > 4 else "")
            lines.append(f"bias compensation (output biases added) at {len(self.compensated)} linears: {shown}")
        whole = [g for g in self.groups if g.note]
        if whole:
            lines.append(f"planned but kept whole ({len(whole)} groups):")
            lines += [f"  - {g.kind} [{', '.join(g.params[:3])}]: {g.note}" for g in whole]
        if self.skipped and self.groups:
            lines.append(f"left dense ({len(self.skipped)} groups):")
            lines += self._skipped_lines()
        return "\n".join(lines)

    def nothing_reason(self) -> str:
        """Why no group was planned, in words: the skipped groups and their reasons, or that no coupled
        channels were found at all."""
        if not self.skipped:
            return (
                "no coupled channels were found (ecospa_fx prunes channels shared by linear layers: "
                "attention q/k and v/o, feed-forward pairs; other layers such as convolutions are left as "
                "they are)"
            )
        return "\n".join([f"every coupled group was left dense ({len(self.skipped)}):", *self._skipped_lines()])

    def _skipped_lines(self) -> list[str]:
        out = []
        for s in self.skipped:
            shown = ", ".join(s.params[:3]) + (" ..." if len(s.params) > 3 else "")
            out.append(f"  - {s.kind} [{shown}]: {'; '.join(s.reasons[:2])}")
        return out

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict:
        """JSON-ready: settings, parameter counts, groups (layer, kind, units kept, member widths) and
        what was left dense and why."""
        return {
            "sparsity": self.sparsity,
            "granularity": self.granularity,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "max_abs_diff": self.max_abs_diff,
            "compensated": list(self.compensated),
            "refit": list(self.refit),
            "not_refit": list(self.not_refit),
            "counts": {k: self.count(k) for k in KINDS},
            "groups": [
                {
                    "layer": g.layer,
                    "kind": g.kind,
                    "units": g.units,
                    "units_kept": g.units - g.units_removed,
                    "note": g.note,
                    "members": [{"param": m.param, "dim": m.dim, "size": m.size, "kept": m.kept} for m in g.members],
                }
                for g in self.groups
            ],
            "skipped": [{"kind": s.kind, "params": list(s.params), "reasons": list(s.reasons)} for s in self.skipped],
        }


def _short(param: str) -> str:
    """``layers.3.mlp.up.weight`` -> ``up``; a top-level ``memory`` stays ``memory``."""
    parts = param.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]
