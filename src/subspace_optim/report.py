"""What the optimizer holds and does, per parameter: :func:`state_report`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor, nn

from .memory import _tensor_bytes
from .optim.base import SubspaceOptimizer
from .projectors.base import matrix_shape, resolve_side


@dataclass
class ParameterReport:
    name: str
    shape: tuple[int, ...]
    projector: str  # "full rank" for parameters updated in full
    side: str  # "left" or "right" for projected parameters, else ""
    rank: int | None
    state_bytes: int
    refreshes: int  # in this process
    last_refresh_step: int | None  # 0-based; None before any refresh in this process


class StateReport:
    """Rows of :class:`ParameterReport` (``rows``, ``to_dicts()``), printed as a table."""

    COLUMNS = ("name", "shape", "projector", "side", "rank", "state_bytes", "refreshes",
               "last_refresh_step")

    def __init__(self, rows: list[ParameterReport]) -> None:
        self.rows = rows

    @property
    def total_bytes(self) -> int:
        return sum(r.state_bytes for r in self.rows)

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def __str__(self) -> str:
        def cell(row: ParameterReport, key: str) -> str:
            value = getattr(row, key)
            if key == "shape":
                return "x".join(map(str, value))
            if key == "state_bytes":
                return f"{value:,}"
            return "" if value is None else str(value)

        table = [list(self.COLUMNS)] + [[cell(r, k) for k in self.COLUMNS] for r in self.rows]
        table.append(["total", "", "", "", "", f"{self.total_bytes:,}", "", ""])
        widths = [max(len(row[i]) for row in table) for i in range(len(self.COLUMNS))]
        right = {"rank", "state_bytes", "refreshes", "last_refresh_step"}
        lines = []
        for row in table:
            lines.append("  ".join(value.rjust(w) if key in right else value.ljust(w)
                                   for value, w, key in zip(row, widths, self.COLUMNS,
                                                            strict=True)).rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"StateReport({len(self.rows)} parameters, {self.total_bytes:,} bytes)"


def state_report(optimizer: SubspaceOptimizer, model: nn.Module | None = None) -> StateReport:
    """Per parameter of ``optimizer``: its name (from ``model``'s named parameters when
    given, else the group's ``param_names`` or its index), shape, projector and side (or
    "full rank"), rank, bytes of optimizer state (counted from the tensors), and the
    refreshes this process ran and the step of the last. ``str()`` of the result is a
    table; ``.rows`` and ``.to_dicts()`` are the data."""
    names: dict[int, str] = {}
    if model is not None:
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        for name, module in model.named_modules():  # INT8 weights: parameters too
            weight = getattr(module, "weight", None)
            if isinstance(weight, Tensor) and id(weight) not in names:
                names[id(weight)] = f"{name}.weight" if name else "weight"
    rows = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            projected = optimizer.projects(p, group)
            side = ""
            if projected:
                side = resolve_side(matrix_shape(p.shape), group["proj_type"]).value
            refreshes, last, _ = optimizer.last_refresh(p) or (0, None, None)
            rows.append(ParameterReport(
                name=names.get(id(p)) or str(optimizer.param_name(p)),
                shape=tuple(p.shape),
                projector=group["projector"] if projected else "full rank",
                side=side,
                rank=group["rank"] if projected else None,
                state_bytes=_tensor_bytes(optimizer.state.get(p, {})),
                refreshes=refreshes,
                last_refresh_step=last))
    return StateReport(rows)
