"""Latency samples, percentiles and a ghz-like summary.

Samples are milliseconds in plain lists while a run goes on (an append is the cheapest
thing a driver can do per fix) and numpy arrays once they are merged.

>>> summary = summarize(np.array([1.0, 2.0, 3.0, 4.0]), duration_s=2.0)
>>> summary["count"], summary["rate_per_s"], summary["p50_ms"]
(4, 2.0, 2.5)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def _key(p: float) -> str:
    return f"p{p:g}".replace(".", "_") + "_ms"


def summarize(samples_ms: np.ndarray, duration_s: float) -> dict[str, float | int]:
    """Count, rate and latency percentiles of one kind of sample."""
    count = int(samples_ms.size)
    out: dict[str, float | int] = {
        "count": count,
        "rate_per_s": round(count / duration_s, 1) if duration_s > 0 else 0.0,
    }
    if count == 0:
        return out
    values = np.percentile(samples_ms, PERCENTILES)
    out.update(
        {_key(p): round(float(v), 3) for p, v in zip(PERCENTILES, values, strict=True)}
    )
    out["mean_ms"] = round(float(samples_ms.mean()), 3)
    out["min_ms"] = round(float(samples_ms.min()), 3)
    out["max_ms"] = round(float(samples_ms.max()), 3)
    return out


def merge(parts: Iterable[Iterable[float]]) -> np.ndarray:
    arrays = [
        np.asarray(list(p) if not isinstance(p, np.ndarray) else p) for p in parts
    ]
    arrays = [a for a in arrays if a.size]
    return np.concatenate(arrays).astype(np.float64) if arrays else np.zeros(0)


def merge_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return dict(sorted(total.items()))


def format_summary(title: str, summary: Mapping[str, float | int]) -> str:
    """A block in the style of ghz's summary: count, rate, then the distribution."""
    lines = [f"{title}:", f"  Count:        {summary['count']}"]
    lines.append(f"  Rate:         {summary['rate_per_s']:.1f} /s")
    if summary["count"]:
        lines += [
            f"  Fastest:      {summary['min_ms']:.2f} ms",
            f"  Average:      {summary['mean_ms']:.2f} ms",
            f"  Slowest:      {summary['max_ms']:.2f} ms",
            "  Latency distribution:",
        ]
        for p in PERCENTILES:
            lines.append(f"    {p:5g} % in {summary[_key(p)]:.2f} ms")
    return "\n".join(lines)


def format_counts(title: str, counts: Mapping[str, int]) -> str:
    lines = [f"{title}:"]
    if not counts:
        lines.append("  (none)")
    lines += [f"  [{name}]  {count}" for name, count in counts.items()]
    return "\n".join(lines)
