"""Small helpers the benchmarks share: percentiles and Markdown tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def percentile(xs: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile of a non-empty sample."""
    if not xs:
        raise ValueError("percentile of an empty sample")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def pct(xs: Sequence[float], q: float) -> float | None:
    """:func:`percentile` in seconds rounded to the millisecond; ``None`` if empty."""
    return round(percentile(xs, q), 3) if xs else None


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table's lines: header, separator, one line a row."""
    return ([f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
            + [f"| {' | '.join(str(c) for c in row)} |" for row in rows])


__all__ = ["md_table", "pct", "percentile"]
