"""Figures, their summaries and ratios, and the table that ``make bench`` prints."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Summary:
    """Median, min and max of a figure over the repetitions."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary | None:
        """The summary of ``values``, or None when there are none."""
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, digits: int = 0) -> str:
        """``median [min–max]``."""
        if self.n == 1:
            return f"{self.median:,.{digits}f}"
        return f"{self.median:,.{digits}f} [{self.min:,.{digits}f}–{self.max:,.{digits}f}]"


@dataclass
class Series:
    """The per-repetition values of one measured figure, or why it could not be measured."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    error: str | None = None

    def add(self, value: float) -> None:
        self.values.append(value)

    def fail(self, error: BaseException | str) -> None:
        """Record the first failure; the figure is reported as n/a with it."""
        if self.error is None:
            self.error = (
                f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
            )

    @property
    def summary(self) -> Summary | None:
        return None if self.error else Summary.of(self.values)


def ratios(measured: Series, baseline: Series) -> list[float]:
    """``measured / baseline`` for each repetition in which both were measured."""
    if measured.error or baseline.error:
        return []
    return [m / b for m, b in zip(measured.values, baseline.values, strict=False) if b > 0]


@dataclass
class Row:
    """One line of the table: a figure next to its baseline, with the ratio and the goal."""

    measurement: str
    unit: str
    value: Summary | None
    error: str | None = None
    baseline: str | None = None
    baseline_value: Summary | None = None
    ratio: Summary | None = None
    goal: str | None = None
    met: bool | None = None
    digits: int = 0

    @classmethod
    def compare(
        cls,
        measurement: str,
        measured: Series,
        baseline: Series,
        baseline_name: str,
        minimum_ratio: float | None = None,
    ) -> Row:
        """A row for ``measured`` against ``baseline``, per repetition."""
        ratio = Summary.of(ratios(measured, baseline))
        met = None
        if minimum_ratio is not None and ratio is not None:
            met = ratio.median >= minimum_ratio
        return cls(
            measurement=measurement,
            unit=measured.unit,
            value=measured.summary,
            error=measured.error,
            baseline=baseline_name,
            baseline_value=baseline.summary,
            ratio=ratio,
            goal=f"≥ {minimum_ratio:g}×" if minimum_ratio is not None else None,
            met=met,
        )

    @classmethod
    def ceiling(cls, measurement: str, measured: Series, limit: float, digits: int = 1) -> Row:
        """A row for a figure that must stay at or below ``limit``."""
        summary = measured.summary
        return cls(
            measurement=measurement,
            unit=measured.unit,
            value=summary,
            error=measured.error,
            goal=f"≤ {limit:g} {measured.unit}",
            met=None if summary is None else summary.median <= limit,
            digits=digits,
        )

    def cells(self) -> list[str]:
        """The row as table cells."""
        if self.value is not None:
            value = f"{self.value.text(self.digits)} {self.unit}"
        else:
            value = f"n/a ({_short(self.error)})"
        base = ""
        if self.baseline:
            figure = self.baseline_value.text(self.digits) if self.baseline_value else "n/a"
            base = f"{self.baseline}: {figure}"
        ratio = self.ratio.text(2) + "×" if self.ratio else ""
        verdict = {True: "yes", False: "NO", None: ""}[self.met]
        return [self.measurement, value, base, ratio, self.goal or "", verdict]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(error: str | None, limit: int = 60) -> str:
    text = (error or "not measured").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


HEADERS = ["measurement", "median [min–max]", "baseline", "ratio", "goal", "met"]


def table(rows: Sequence[Row]) -> str:
    """The rows as a plain-text table (also valid Markdown)."""
    body = [HEADERS, *[row.cells() for row in rows]]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADERS))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(body[0]), rule, *[line(cells) for cells in body[1:]]])
