"""Reading `results.json` for the report: formatting of numbers with their intervals and verdicts, markdown
tables, and the (adapter, layer) grid with the paper's values beside ours."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

DASH = "—"
VERDICT = {1: "▲", -1: "▼", 0: "≈"}
"""vs_null as printed: interval above / below / overlapping the null's."""
VERDICT_WORDS = {1: "above its null", -1: "below its null", 0: "indistinguishable from its null"}


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def get(record: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(record, Mapping) or key not in record:
            return None
        record = record[key]
    return record


def value_of(m: Any) -> Any:
    """The number of a measured value `{"value", ...}` (or a plain number)."""
    return m.get("value") if isinstance(m, Mapping) else m


OUTSIDE = "†"
"""Marks a number whose interval does not contain it (see `ci`)."""


def ci(m: Any, digits: int = 3, *, verdict: bool = False) -> str:
    """`value [low, high]` (+ the verdict mark) of a measured value; a plain number as itself. A bias-corrected
    value (CKA) is shown beside the plain one, as the interval is centred on it; `†` marks a value outside its
    interval (the statistic shifts under resampling: biased, or unstable like a barely defined subspace)."""
    if not isinstance(m, Mapping):
        return fmt(m, digits)
    text = fmt(m.get("value"), digits)
    centre = m.get("value")
    if m.get("bias_corrected") is not None:
        centre = m["bias_corrected"]
        text += f" (bias-corrected {fmt(centre, digits)})"
    low, high = m.get("ci_low"), m.get("ci_high")
    if "ci_low" in m:
        text += f" [{fmt(low, digits)}, {fmt(high, digits)}]"
        if None not in (centre, low, high) and not low - 1e-12 <= centre <= high + 1e-12:
            text += OUTSIDE
    if verdict and m.get("vs_null") is not None:
        text += f" {VERDICT[m['vs_null']]}"
    return text


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class View:
    """Read access to `results.json` by (adapter, layer), and the paper's values beside ours."""

    def __init__(self, results: Mapping[str, Any], with_paper: bool):
        self.results = results
        self.meta = results["meta"]
        self.with_paper = with_paper
        self.adapters = list(self.meta["adapters"])
        self.ranks = dict(zip(self.adapters, self.meta["ranks"], strict=True))
        self.layers = list(self.meta["layers"])
        self.primary = self.meta["sae_seeds"][0]

    def layer(self, layer: int) -> Mapping[str, Any]:
        return self.results["layers"][f"L{layer}"]

    def cell(self, adapter: str, layer: int) -> Mapping[str, Any]:
        return self.layer(layer)["adapters"][adapter]

    def value(self, adapter: str, layer: int, table_name: str, path: str) -> Any:
        return get(self.cell(adapter, layer).get(table_name, {}), path)

    def cells(self) -> list[tuple[str, int]]:
        return [(a, layer) for a in self.adapters for layer in self.layers]

    def grid(self, render: Callable[[str, int], str], paper: Mapping[int, Mapping[int, float]] | None = None,
             digits: int = 3) -> str:
        """Layer rows x adapter columns of `render(adapter, layer)`; with the paper's grid (layer -> rank ->
        value) its value stands beside ours in parentheses where it has that (rank, layer), and its rows for
        the layers this run does not have follow, labelled `paper L<l>`."""
        paper = paper if self.with_paper else None
        rows = []
        for layer in self.layers:
            row = [f"L{layer}"]
            for a in self.adapters:
                text = render(a, layer)
                theirs = None if paper is None else paper.get(layer, {}).get(self.ranks[a])
                row.append(text if theirs is None else f"{text} (paper {fmt(theirs, digits)})")
            rows.append(row)
        if paper is not None:
            for layer, by_rank in paper.items():
                if layer in self.layers or not any(self.ranks[a] in by_rank for a in self.adapters):
                    continue
                rows.append([f"paper L{layer}", *(fmt(by_rank.get(self.ranks[a]), digits) for a in self.adapters)])
        return table(["layer", *self.adapters], rows)

    def long(self, columns: Sequence[tuple[str, Callable[[str, int], str]]]) -> str:
        rows = [[a, f"L{layer}", *(render(a, layer) for _, render in columns)] for a, layer in self.cells()]
        return table(["adapter", "layer", *(name for name, _ in columns)], rows)
