"""The server's stalls over a load run's steady state, read from its ``/metrics``:
event-loop lag samples and garbage-collector pauses (``observability.runtime``),
and the server's own share of the ack time: receipt to stored, and the group
commits' write time. Set beside the drivers' fix-to-ack times they tell whether a
slow ack waited in the server, in its database write or outside the server.

The histograms' buckets are coarse (0.5, 1, 2.5, 5, 10, 25, 50, 100 ms ...), so a
run reports counts over thresholds and the bucket that holds the longest pause,
not percentiles.
"""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

LOOP_LAG = "tracking_event_loop_lag_seconds"
GC_PAUSE = "tracking_gc_pause_seconds"
SERVER_ACK = "tracking_fix_ack_seconds"
COMMIT_WAIT = "tracking_commit_wait_seconds"
COMMIT = "tracking_storage_flush_seconds"
KEYS = {
    LOOP_LAG: "loop",
    SERVER_ACK: "server_ack",
    COMMIT_WAIT: "commit_wait",
    COMMIT: "commit",
}
THRESHOLDS_MS = (10, 25, 100)
TIME_THRESHOLDS_MS = (10, 25, 50, 100)
GENERATIONS = {"0": "young", "1": "middle", "2": "full"}


@dataclass
class Histogram:
    """Cumulative bucket counts by upper bound (seconds), and the sum."""

    buckets: dict[float, float] = field(default_factory=dict)
    total_s: float = 0.0

    @property
    def count(self) -> float:
        return self.buckets.get(math.inf, 0.0)

    def minus(self, before: Histogram) -> Histogram:
        return Histogram(
            {le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.total_s - before.total_s,
        )

    def over(self, seconds: float) -> int:
        """Observations above ``seconds`` (a bucket bound)."""
        return int(self.count - self.buckets.get(seconds, 0.0))

    def quantile_at_most_s(self, q: float) -> float | None:
        """The smallest bucket bound that holds a ``q`` share of observations."""
        if not self.count:
            return None
        return min(le for le, n in self.buckets.items() if n >= q * self.count)

    def longest_at_most_s(self) -> float | None:
        """The smallest bucket bound that holds every observation."""
        if not self.count:
            return None
        return min(le for le, n in self.buckets.items() if n >= self.count)


def snapshot(url: str, timeout_s: float = 5.0) -> dict[str, Histogram]:
    """The loop-lag, server-ack and commit histograms (commits summed over
    backends), and one GC-pause histogram per generation."""
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        text = answer.read().decode()
    found: dict[str, Histogram] = defaultdict(Histogram)
    for family in text_string_to_metric_families(text):
        if family.name not in (GC_PAUSE, *KEYS):
            continue
        for sample in family.samples:
            key = KEYS.get(family.name) or sample.labels["generation"]
            histogram = found[key]
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                histogram.buckets[le] = histogram.buckets.get(le, 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                histogram.total_s += sample.value
    return dict(found)


def between(before: dict[str, Histogram], after: dict[str, Histogram]) -> dict:
    """What the server's loop and collector did between two snapshots."""
    spans = {k: h.minus(before.get(k, Histogram())) for k, h in after.items()}
    loop = spans.pop("loop", Histogram())
    server_ack = spans.pop("server_ack", Histogram())
    commit_wait = spans.pop("commit_wait", Histogram())
    commit = spans.pop("commit", Histogram())
    out: dict = {
        "loop_lag_samples": int(loop.count),
        "loop_lag_over_ms": {str(ms): loop.over(ms / 1000) for ms in THRESHOLDS_MS},
        "loop_lag_longest_at_most_ms": _ms(loop.longest_at_most_s()),
        "gc": {},
        "server_ack": _times(server_ack),
        "commit_wait": _times(commit_wait),
        "commit": _times(commit),
    }
    for generation, pauses in sorted(spans.items()):
        out["gc"][GENERATIONS.get(generation, generation)] = {
            "passes": int(pauses.count),
            "paused_s": round(pauses.total_s, 3),
            "over_ms": {str(ms): pauses.over(ms / 1000) for ms in THRESHOLDS_MS},
            "longest_at_most_ms": _ms(pauses.longest_at_most_s()),
        }
    return out


def _times(histogram: Histogram) -> dict:
    """Count, mean, the bucket bounds holding half and 99 % of the observations,
    and counts over thresholds."""
    count = int(histogram.count)
    return {
        "count": count,
        "mean_ms": round(histogram.total_s / count * 1000, 2) if count else None,
        "p50_at_most_ms": _ms(histogram.quantile_at_most_s(0.5)),
        "p99_at_most_ms": _ms(histogram.quantile_at_most_s(0.99)),
        "over_ms": {str(ms): histogram.over(ms / 1000) for ms in TIME_THRESHOLDS_MS},
    }


def describe(stalls: dict) -> str:
    """One line for the terminal."""
    over = " / ".join(str(n) for n in stalls["loop_lag_over_ms"].values())
    limits = " / ".join(stalls["loop_lag_over_ms"])
    parts = [
        f"loop late by over {limits} ms in {over} of "
        f"{stalls['loop_lag_samples']} samples"
    ]
    for name, gc in stalls["gc"].items():
        parts.append(
            f"GC {name} {gc['passes']} passes, {gc['paused_s']} s, "
            f"longest <= {gc['longest_at_most_ms']} ms"
        )
    for name, label in (
        ("server_ack", "server ack"),
        ("commit_wait", "wait for commit"),
        ("commit", "commit"),
    ):
        times = stalls.get(name)
        if times and times["count"]:
            parts.append(
                f"{label} mean {times['mean_ms']} ms, p99 <= "
                f"{times['p99_at_most_ms']} ms over {times['count']}"
            )
    return "; ".join(parts)


def _ms(seconds: float | None) -> float | str | None:
    if seconds is None:
        return None
    if math.isinf(seconds):
        return "over the largest bucket"
    return round(seconds * 1000, 1)
