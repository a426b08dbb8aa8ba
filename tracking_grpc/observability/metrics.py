"""Every metric the service exports, and the small functions that record them.

Metrics are off until :func:`enable` is called (``metrics_listen`` set); until then
every recording function returns at once, so the pipeline calls them freely. The
pipeline records per batch, never per fix: ``fixes_received(len(batch))``.

With several worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` (the server does,
see :func:`prepare_workers`) before the workers start: each process then writes its
values to files there and the HTTP endpoint sums them (:func:`serve`).

>>> registry = enable()
>>> fixes_received(3)
>>> registry.get_sample_value("tracking_fixes_received_total")
3.0
>>> disable()
"""

from __future__ import annotations

import bisect
import collections
import glob
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    multiprocess,
    start_http_server,
    values,
)

from tracking_grpc.errors import InvalidArgument

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_S: tuple[float, ...] = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0),
)
PROCESSING_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
STREAM_S = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
BATCH_FIXES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000)
STREAMING_KINDS = ("stream_stream", "unary_stream", "stream_unary")


class Metrics:
    """The one place where every metric is defined (name, help, labels, buckets)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.rpc_started = Counter(
            "tracking_rpc_started", "RPCs started", ["method"], registry=r
        )
        self.rpc_handled = Counter(
            "tracking_rpc_handled",
            "RPCs finished, by gRPC status code (code != OK are errors)",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "tracking_rpc_duration_seconds",
            "time from the start of a unary RPC to its answer",
            ["method"],
            buckets=LATENCY_S,
            registry=r,
        )
        self.stream_seconds = Histogram(
            "tracking_stream_duration_seconds",
            "how long streaming RPCs stayed open",
            ["method"],
            buckets=STREAM_S,
            registry=r,
        )
        self.streams_open = Gauge(
            "tracking_streams_open",
            "streaming RPCs open now",
            ["method"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.watchers_open = Gauge(
            "tracking_watchers_open",
            "live-position watchers subscribed now",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.fixes_received = Counter(
            "tracking_fixes_received", "fixes received from devices", registry=r
        )
        self.fixes_accepted = Counter(
            "tracking_fixes_accepted",
            "fixes validated and stored for the first time",
            registry=r,
        )
        self.fixes_rejected = Counter(
            "tracking_fixes_rejected",
            "fixes rejected by validation, by reason",
            ["reason"],
            registry=r,
        )
        self.fixes_deduplicated = Counter(
            "tracking_fixes_deduplicated",
            "fixes acknowledged as duplicates of stored fixes",
            registry=r,
        )
        self.ack_seconds = Histogram(
            "tracking_fix_ack_seconds",
            "time from receiving a message of fixes to acknowledging it",
            buckets=LATENCY_S,
            registry=r,
        )
        self.commit_wait_seconds = Histogram(
            "tracking_commit_wait_seconds",
            "time from receiving a message of fixes to the start of its group "
            "commit (the rest of its ack time is the commit's write)",
            buckets=LATENCY_S,
            registry=r,
        )
        self.events = Counter(
            "tracking_events", "events emitted, by type", ["type"], registry=r
        )
        self.watch_updates = Counter(
            "tracking_watch_updates",
            "watcher updates: sent, coalesced (replaced by a newer unsent one) or "
            "dropped (older than one the watcher already has)",
            ["outcome"],
            registry=r,
        )
        self.fanout_received = Counter(
            "tracking_fanout_received_fixes",
            "live updates (fixes) this process received from other processes for "
            "its watchers",
            registry=r,
        )
        self.fixes_unprocessed = Counter(
            "tracking_fixes_unprocessed",
            "stored fixes the event processors had not begun when a stop's "
            "deadline passed: their events were not raised",
            registry=r,
        )
        self.processor_failures = Counter(
            "tracking_processor_failures",
            "devices an event processor failed on and left out of a batch (each "
            "once per batch): their fixes of that batch raised none of its events",
            ["processor"],
            registry=r,
        )
        self.processor_skipped_fixes = Counter(
            "tracking_processor_skipped_fixes",
            "stored fixes left out of an event processor because it failed on "
            "their device's fixes of a batch",
            ["processor"],
            registry=r,
        )
        self.event_store_queued = Gauge(
            "tracking_event_store_queued",
            "events waiting to be written to the event store (ListEvents, the event "
            "stream); at event_queue_max the event processors wait for room",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.stream_events_dropped = Counter(
            "tracking_stream_events_dropped",
            "events not delivered to a device stream that stopped reading",
            registry=r,
        )
        self.storage_batch_fixes = Histogram(
            "tracking_storage_batch_fixes",
            "fixes per group commit",
            ["backend"],
            buckets=BATCH_FIXES,
            registry=r,
        )
        self.storage_flush_seconds = Histogram(
            "tracking_storage_flush_seconds",
            "time to write one group commit",
            ["backend"],
            buckets=LATENCY_S,
            registry=r,
        )
        self.storage_flush_failures = Counter(
            "tracking_storage_flush_failures",
            "group commits that failed",
            ["backend"],
            registry=r,
        )
        self.live_update_failures = Counter(
            "tracking_live_update_failures",
            "live updates of stored fixes that failed (positions, GEO index, "
            "watchers): unavailable (the live store is down; rebuilt from history "
            "when it returns) or error (a fault of the update itself)",
            ["reason"],
            registry=r,
        )
        self.dependency_up = Gauge(
            "tracking_dependency_up",
            "1 when the last health check of a dependency passed, else 0",
            ["dependency"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.dependency_check_seconds = Histogram(
            "tracking_dependency_check_seconds",
            "time of one dependency health check",
            ["dependency"],
            buckets=LATENCY_S,
            registry=r,
        )
        self.gc_pause_seconds = Histogram(
            "tracking_gc_pause_seconds",
            "how long one pass of Python's garbage collector stopped the process, "
            "by generation (0 young, 1 middle, 2 full)",
            ["generation"],
            buckets=LATENCY_S,
            registry=r,
        )
        self.loop_lag_seconds = Histogram(
            "tracking_event_loop_lag_seconds",
            "how late a timer of the event loop fired, sampled ten times a second: "
            "time every stream and commit waited for the loop",
            buckets=LATENCY_S,
            registry=r,
        )
        self.processing_lag_seconds = Histogram(
            "tracking_processing_lag_seconds",
            "from receipt of the oldest fix of a processed piece to the end of its "
            "processing (geofence and activity events): how far events trail fixes",
            buckets=PROCESSING_S,
            registry=r,
        )
        self._children: dict[tuple[str, ...], Any] = {}

    def child(self, metric: str, *labels: str) -> Any:
        """The labelled child of a metric, cached: ``labels()`` costs ~0.8 µs."""
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = getattr(self, metric).labels(*labels)
            self._children[key] = found
        return found


_m: Metrics | None = None
_registry: CollectorRegistry | None = None
_reasons: dict[int, str] = {}


def enabled() -> bool:
    return _m is not None


def enable() -> CollectorRegistry:
    """Create the metrics and start recording; returns the registry to expose."""
    global _m, _registry
    multiproc_dir = os.environ.get(MULTIPROC_ENV)
    if multiproc_dir:
        # The value class is chosen when prometheus_client is imported; a process
        # that imported it before the variable was set switches here.
        values.ValueClass = values.MultiProcessValue()
    registry = CollectorRegistry()
    _m = Metrics(registry)
    if multiproc_dir:
        exposed = CollectorRegistry()
        multiprocess.MultiProcessCollector(exposed, path=multiproc_dir)
        _registry = exposed
    else:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        _registry = registry
    return _registry


def registry() -> CollectorRegistry | None:
    """The registry that /metrics exposes, or None while metrics are off."""
    return _registry


def disable() -> None:
    global _m, _registry
    _m = None
    _registry = None


def metric_names() -> set[str]:
    """Names of every sample the service can export (for dashboards and alerts)."""
    registry = CollectorRegistry()
    Metrics(registry)
    names = set()
    for family in registry.collect():
        for suffix in _sample_suffixes(family.type):
            names.add(family.name + suffix)
    return names


def _sample_suffixes(kind: str) -> tuple[str, ...]:
    if kind == "counter":
        return ("_total", "_created")
    if kind == "histogram":
        return ("_bucket", "_count", "_sum", "_created")
    return ("",)


def serve(listen: str) -> tuple[Any, Any]:
    """Expose the metrics over HTTP at ``listen`` (host:port); returns the server.
    Raises ``InvalidArgument`` when it cannot listen there (the port is taken)."""
    if _registry is None:
        raise RuntimeError("metrics.enable() must be called before serve()")
    host, _, port = listen.rpartition(":")
    try:
        server, thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=_registry
        )
    except OSError as exc:
        reason = f"cannot listen on {listen}: {exc.strerror or exc}"
        raise InvalidArgument("metrics_listen", reason) from exc
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread


def prepare_workers() -> str:
    """Point every worker started from now on at one emptied multiprocess directory.

    The directory is ``PROMETHEUS_MULTIPROC_DIR`` when set (its old ``*.db`` files
    are removed: values of an earlier run must not add up), else a new one.
    """
    path = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="tracking-metrics-")
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.remove(stale)
    os.environ[MULTIPROC_ENV] = path
    return path


def worker_exited(pid: int) -> None:
    """Forget a dead worker's live gauges (open streams, watchers, health)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        multiprocess.mark_process_dead(pid, path)


# Recording functions: each is a no-op while metrics are off.


def rpc_started(method: str) -> None:
    if _m is not None:
        _m.child("rpc_started", method).inc()


def rpc_handled(method: str, code: str, seconds: float, streaming: bool) -> None:
    if _m is not None:
        _m.child("rpc_handled", method, code).inc()
        duration = "stream_seconds" if streaming else "rpc_seconds"
        _m.child(duration, method).observe(seconds)


def stream_opened(method: str) -> None:
    if _m is not None:
        _m.child("streams_open", method).inc()


def stream_closed(method: str) -> None:
    if _m is not None:
        _m.child("streams_open", method).dec()


def watcher_opened() -> None:
    if _m is not None:
        _m.watchers_open.inc()


def watcher_closed() -> None:
    if _m is not None:
        _m.watchers_open.dec()


def fixes_received(n: int) -> None:
    if _m is not None and n:
        _m.fixes_received.inc(n)


def fixes_accepted(n: int) -> None:
    if _m is not None and n:
        _m.fixes_accepted.inc(n)


def fixes_deduplicated(n: int) -> None:
    if _m is not None and n:
        _m.fixes_deduplicated.inc(n)


def fixes_rejected(reason: str, n: int = 1) -> None:
    if _m is not None and n:
        _m.child("fixes_rejected", reason).inc(n)


def fixes_rejected_codes(codes: np.ndarray | Iterable[int]) -> None:
    """Count rejections given as ``tracking.v1.RejectReason`` numbers, one per fix."""
    if _m is None:
        return
    found, counts = np.unique(np.asarray(codes, dtype=np.int64), return_counts=True)
    for code, count in zip(found.tolist(), counts.tolist(), strict=True):
        _m.child("fixes_rejected", reject_reason_name(code)).inc(count)


def reject_reason_name(code: int) -> str:
    """``REJECT_REASON_FUTURE_TIME`` (5) -> ``future_time``."""
    name = _reasons.get(code)
    if name is None:
        from tracking.v1 import track_pb2

        try:
            full = track_pb2.RejectReason.Name(code)
        except ValueError:
            full = f"REJECT_REASON_CODE_{code}"
        name = full.removeprefix("REJECT_REASON_").lower()
        _reasons[code] = name
    return name


def fixes_validated(reasons: np.ndarray) -> None:
    """Count a received batch and its rejections (reason codes, 0 = valid)."""
    if _m is None:
        return
    _m.fixes_received.inc(len(reasons))
    if reasons.any():
        fixes_rejected_codes(reasons[reasons != 0])


def fixes_stored(valid: np.ndarray, new: np.ndarray) -> None:
    """Count the outcome of a group commit: new fixes and duplicates."""
    if _m is None:
        return
    accepted = int(np.count_nonzero(new))
    duplicates = int(np.count_nonzero(valid)) - accepted
    if accepted:
        _m.fixes_accepted.inc(accepted)
    if duplicates:
        _m.fixes_deduplicated.inc(duplicates)


def fix_acked(seconds: float) -> None:
    """Time from a submission's arrival to its fixes being stored."""
    if _m is not None:
        _m.ack_seconds.observe(seconds)


def fixes_acked(now_ms: float, received_ms: list[int]) -> None:
    """:func:`fix_acked` for many submissions at once, received at ``received_ms``
    and acked at ``now_ms``: one histogram update per bucket hit instead of a
    Python ``observe`` (a lock per bucket and sum) per message of a group
    commit."""
    if _m is None or not received_ms:
        return
    observe_many(_m.ack_seconds, [(now_ms - r) / 1000 for r in received_ms])


def commit_started(now_ms: float, received_ms: list[int]) -> None:
    """A group commit starts at ``now_ms`` with submissions received at
    ``received_ms``: how long each waited for it (as :func:`fixes_acked`)."""
    if _m is None or not received_ms:
        return
    observe_many(_m.commit_wait_seconds, [(now_ms - r) / 1000 for r in received_ms])


def observe_many(histogram: Histogram, amounts: list[float]) -> None:
    """``histogram.observe(a)`` for every ``a`` of ``amounts``, by bucket (a
    histogram without labels; prometheus_client keeps its buckets and sum as
    values, each counted with ``inc``)."""
    if len(amounts) == 1:
        histogram.observe(amounts[0])
        return
    bounds = histogram._upper_bounds  # ascending, ends with +Inf
    hits: dict[int, int] = {}
    for amount in amounts:
        # observe counts a value in the first bucket whose bound is not below it
        index = bisect.bisect_left(bounds, amount)
        hits[index] = hits.get(index, 0) + 1
    histogram._sum.inc(sum(amounts))
    for index, count in hits.items():
        histogram._buckets[index].inc(count)


def events_emitted(types: Iterable[Any]) -> None:
    """Count events by type; ``types`` are EventType members or events."""
    if _m is None:
        return
    kinds = collections.Counter(getattr(t, "type", t) for t in types)
    for kind, count in kinds.items():
        _m.child("events", getattr(kind, "name", str(kind)).lower()).inc(count)


def watch_updates(outcome: str, n: int = 1) -> None:
    """Record watcher updates: ``sent``, ``coalesced`` or ``dropped`` (outdated)."""
    if _m is not None and n:
        _m.child("watch_updates", outcome).inc(n)


def fanout_received(n: int) -> None:
    """Record fixes received from other processes for this process's watchers."""
    if _m is not None and n:
        _m.fanout_received.inc(n)


def backend_name(store: object) -> str:
    """``SqliteHistoryStore`` -> ``sqlite``: the ``backend`` label of a store."""
    name = getattr(store, "backend", None)
    if isinstance(name, str):
        return name
    kind = type(store).__name__.lower()
    for suffix in ("historystore", "livestore", "store", "broker"):
        kind = kind.removesuffix(suffix)
    return kind or "unknown"


def fixes_unprocessed(n: int) -> None:
    """Count stored fixes left to no processor by a stop."""
    if _m is not None and n:
        _m.fixes_unprocessed.inc(n)


def processor_failed(processor: str, devices: int, fixes: int) -> None:
    """Count devices (and their fixes) a processor failed on and left out."""
    if _m is not None:
        _m.child("processor_failures", processor).inc(devices)
        _m.child("processor_skipped_fixes", processor).inc(fixes)


def event_store_queued(n: int) -> None:
    """Set how many events wait for the event store."""
    if _m is not None:
        _m.event_store_queued.set(n)


def stream_events_dropped(n: int) -> None:
    if _m is not None and n:
        _m.stream_events_dropped.inc(n)


def storage_flushed(backend: str, fixes: int, seconds: float) -> None:
    if _m is not None:
        _m.child("storage_batch_fixes", backend).observe(fixes)
        _m.child("storage_flush_seconds", backend).observe(seconds)


def storage_flush_failed(backend: str) -> None:
    if _m is not None:
        _m.child("storage_flush_failures", backend).inc()


def live_update_failed(reason: str) -> None:
    """Count a live update that failed after its fixes were stored."""
    if _m is not None:
        _m.child("live_update_failures", reason).inc()


@contextmanager
def timed_flush(backend: str, fixes: int) -> Iterator[None]:
    """Time one group commit; a raised exception counts as a failed flush."""
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        storage_flush_failed(backend)
        raise
    storage_flushed(backend, fixes, time.perf_counter() - start)


def dependency_checked(name: str, up: bool, seconds: float) -> None:
    if _m is not None:
        _m.dependency_up.labels(name).set(1.0 if up else 0.0)
        _m.dependency_check_seconds.labels(name).observe(seconds)


def gc_paused(generation: int, seconds: float) -> None:
    if _m is not None:
        _m.child("gc_pause_seconds", str(generation)).observe(seconds)


def processed(lag_s: float) -> None:
    if _m is not None:
        _m.processing_lag_seconds.observe(lag_s)


def loop_lagged(seconds: float) -> None:
    if _m is not None:
        _m.loop_lag_seconds.observe(seconds)
