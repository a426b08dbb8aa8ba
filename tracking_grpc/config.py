"""Settings: one definition, read from defaults, a TOML file, the environment and flags.

Each setting is a dataclass field whose metadata carries its help text; the
environment variable is ``TRACKING_`` plus the upper-cased name. Later sources win:
defaults < ``--config FILE`` (TOML, top-level keys or a ``[tracking]`` table) <
environment < command-line flags.
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from tracking_grpc.errors import InvalidArgument

ENV_PREFIX = "TRACKING_"


def setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the service; see the README's configuration reference."""

    listen: str = setting("127.0.0.1:50051", "address the gRPC server listens on")
    data_dir: str = setting("var/tracking", "directory of the embedded SQLite store")
    database_url: str = setting(
        "", "PostgreSQL URL (postgresql://...); empty uses the embedded SQLite store"
    )
    redis_url: str = setting(
        "", "Redis URL (redis://...); empty keeps live state in the process"
    )
    redis_key_prefix: str = setting(
        "trk:", "prefix of every Redis key and channel (several deployments, one Redis)"
    )
    fanout_interest_ttl_s: float = setting(
        30.0,
        "seconds a server process's watch interest outlives its last heartbeat in "
        "Redis: a crashed process stops being sent live updates after this",
    )
    database_pool_size: int = setting(8, "PostgreSQL connections per server process")
    database_timeout_s: float = setting(
        5.0,
        "longest wait for a PostgreSQL connection, or for a lock a statement needs, "
        "before a store call fails (writes are retried); also how long a cancelled "
        "read may take to end before its connection is dropped",
    )
    workers: int = setting(1, "server processes sharing the port (SO_REUSEPORT)")
    max_future_skew_s: float = setting(
        600.0, "reject fixes stamped more than this many seconds after receipt"
    )
    max_fix_age_s: float = setting(
        30 * 86400.0,
        "reject fixes older than this many seconds at receipt; 0 accepts any age",
    )
    max_batch_fixes: int = setting(100_000, "most fixes accepted in one message")
    flush_interval_ms: float = setting(
        5.0, "longest a received fix waits for its group commit (embedded store)"
    )
    database_flush_interval_ms: float = setting(
        10.0,
        "flush_interval_ms on PostgreSQL, where each commit costs the database "
        "about a millisecond of CPU whatever its size",
    )
    flush_max_fixes: int = setting(20_000, "fixes per group commit at most")
    live_write_interval_ms: float = setting(
        20.0,
        "least time between two writes of live positions to Redis: the commits "
        "stored meanwhile share one write (the in-process live store is written "
        "at once; this process's watchers get positions before the write)",
    )
    processor_interval_ms: float = setting(
        100.0,
        "least time between two runs of the event processors (geofences, "
        "activity); fixes stored meanwhile go through together",
    )
    dwell_lateness_s: float = setting(
        30.0,
        "how late a fix may reach the geofence detector: a device silent inside a "
        "fence gets its DWELL this long after its stay reached the fence's dwell_ms "
        "(a fix saying it left before then, arriving within it, prevents the "
        "DWELL); a geofence take-over judges again the device's stored fixes "
        "received this recently",
    )
    commits_in_flight: int = setting(
        4, "group commits running at once on a store that allows it (PostgreSQL)"
    )
    max_pending_fixes: int = setting(
        200_000, "fixes waiting for storage before streams are paused (back-pressure)"
    )
    max_waiting_batch_fixes: int = setting(
        20_000,
        "fixes of PublishBatch calls that may wait, as received, while "
        "max_pending_fixes are pending (one call, the first, whatever its size); "
        "a call beyond is refused with RESOURCE_EXHAUSTED and a retry delay, "
        "nothing of it stored (0: refuse every call while congested)",
    )
    event_queue_max: int = setting(
        100_000,
        "events waiting to be written to the event store (ListEvents, the event "
        "stream) at most; beyond, event processing waits and, once "
        "max_pending_fixes are waiting behind it, streams are paused (back-pressure)",
    )
    event_stream_partitions: int = setting(
        1,
        "Redis Streams the events are split over by device (keys after "
        "redis_key_prefix): 1 keeps the one stream geofence-events; N uses "
        "geofence-events:0 to geofence-events:N-1, which a Redis Cluster spreads "
        "over its shards (docs/geofencing.md, before changing it)",
    )
    sqlite_synchronous: str = setting(
        "FULL", "SQLite synchronous mode: FULL makes every ack survive power loss"
    )
    auth_mode: str = setting("off", "off, or jwt: bearer tokens required")
    jwt_hs256_secret: str = setting("", "shared secret for HS256 tokens")
    jwt_rs256_public_key_file: str = setting("", "PEM public key for RS256 tokens")
    jwt_audience: str = setting("", "required audience claim, if set")
    max_token_lifetime_s: float = setting(
        86_400.0,
        "longest a token may be valid: one whose exp is further ahead than this "
        "(or, with an iat, issued for longer) is refused; a day bounds what a "
        "leaked token can do while devices renew theirs once a day",
    )
    default_precision_m: float = setting(
        0.0,
        "coarsest detail, metres, of the positions a caller reads when its token "
        "has no precision_m claim (and of every call when auth is off): positions "
        "are snapped to a grid of cells this wide; 0 shows them exact",
    )
    default_tenant: str = setting("default", "tenant of every call when auth is off")
    max_concurrent_streams: int = setting(
        20_000, "pending RPC backlog the gRPC server accepts (streams opening at once)"
    )
    write_timeout_s: float = setting(
        30.0,
        "longest a stream's response may wait for a client that does not read it; "
        "then the stream ends with RESOURCE_EXHAUSTED (Track, Watch, WatchEvents)",
    )
    stream_window_kb: int = setting(
        64,
        "HTTP/2 receive window of a stream, KB: what a client's messages can fill in "
        "the server while its stream is not read; 0 lets gRPC grow it with the "
        "bandwidth-delay product (to megabytes per stream)",
    )
    max_watchers: int = setting(
        1_000,
        "Watch streams open at once in one server process; more are refused with "
        "RESOURCE_EXHAUSTED",
    )
    routing_data_dir: str = setting(
        "",
        "directory of routing datasets made by `tracking prepare-routing`; empty "
        "disables the Route service (it answers FAILED_PRECONDITION)",
    )
    routing_max_snap_m: float = setting(
        500.0, "refuse route points further than this from any road, metres"
    )
    route_off_route_m: float = setting(
        50.0, "a fix this far from its route beyond its accuracy counts as off route"
    )
    route_off_route_fixes: int = setting(
        3, "consecutive off-route fixes before OFF_ROUTE is raised"
    )
    route_back_on_route_fixes: int = setting(
        2, "consecutive on-route fixes before BACK_ON_ROUTE is raised"
    )
    route_arrival_radius_m: float = setting(
        40.0, "ARRIVED is raised within this distance of the route's destination"
    )
    route_eta_change_s: float = setting(
        60.0, "ETA_UPDATED is raised when the ETA moves by more than this, seconds"
    )
    route_checkpoint_s: float = setting(
        2.0,
        "seconds between saves of the monitoring state of assigned routes that "
        "changed (progress, off-route counts, pace) to the history store, so that "
        "a restarted or another server process continues it",
    )
    route_load_page: int = setting(
        1000,
        "assigned routes per read when a server loads them at start (each page "
        "is read, then prepared in a worker thread; a failed page is retried)",
    )
    activity_config: str = setting(
        "", "TOML file of activity rules per tenant and device (docs/activity.md)"
    )
    activity_checkpoint_s: float = setting(
        30.0,
        "seconds between saves of the live activity of devices that changed "
        "(odometer, stop, trip...) to the history store, so that a restarted or "
        "another server process continues it; 0 keeps it in the process only",
    )
    retention_days: int = setting(
        0,
        "days of history kept: fixes and events (stored and on the Redis "
        "Stream) of UTC days before the last N (and today) are deleted, hourly and "
        "at start (PostgreSQL drops whole day partitions); 0 keeps everything",
    )
    log_format: str = setting("auto", "auto, text or json")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    metrics_listen: str = setting(
        "", "host:port of the Prometheus /metrics endpoint; empty turns metrics off"
    )
    otlp_endpoint: str = setting(
        "", "OTLP/gRPC collector URL for traces (http://host:4317); empty: no tracing"
    )
    trace_sample_ratio: float = setting(
        1.0, "fraction of new traces sampled (0 to 1); a caller's sampled flag wins"
    )

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def merged(
        self, values: Mapping[str, Any], source: str, *, typed: bool = False
    ) -> Settings:
        """A copy with ``values`` applied, converted to each setting's type;
        ``typed`` values (a TOML file's) are not parsed from text."""
        known = {f.name: f for f in fields(self)}
        changes = {}
        for name, raw in values.items():
            if name not in known:
                raise InvalidArgument(f"{source}:{name}", "unknown setting")
            changes[name] = _convert(known[name], raw, f"{source}:{name}", typed)
        return replace(self, **changes)


def _convert(spec: Any, raw: Any, where: str, typed: bool) -> Any:
    """``raw`` as the setting's type. Flags and the environment give strings; a TOML
    file gives ``typed`` values, which must already be of the setting's kind:
    ``int(1.5)`` would truncate, ``int(True)`` is 1, ``str([...])`` is a path and
    ``"2"`` is text, so those are refused rather than converted (so is ``2.0`` for
    a count: TOML has integers)."""
    kind = type(spec.default) if spec.default is not MISSING else str
    wrong = (
        (isinstance(raw, bool) and kind is not bool)
        or (kind is str and not isinstance(raw, str))
        or (kind is int and isinstance(raw, float))
        or (typed and kind in (int, float, bool) and isinstance(raw, str))
    )
    if wrong:
        raise InvalidArgument(where, f"expected {kind.__name__}, got {raw!r}")
    try:
        if kind is bool and isinstance(raw, str):
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(where, f"expected {kind.__name__}, got {raw!r}") from exc


def from_environment(env: Mapping[str, str]) -> dict[str, str]:
    names = set(Settings.names())
    found = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in names:
                found[name] = value
    return found


def from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise InvalidArgument("config", f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument("config", f"{path} is not TOML: {exc}") from exc
    return dict(data.get("tracking", data))


def add_arguments(
    parser: argparse.ArgumentParser, only: Collection[str] | None = None
) -> None:
    """Add ``--config`` and one flag per setting (default None: not given); with
    ``only``, flags for those settings alone (the rest still come from the TOML
    file and the environment)."""
    parser.add_argument("--config", type=Path, help="TOML file of settings")
    for spec in fields(Settings):
        if only is not None and spec.name not in only:
            continue
        flag = "--" + spec.name.replace("_", "-")
        parser.add_argument(
            flag, dest=spec.name, default=None, help=spec.metadata["help"]
        )


def load(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    only: Collection[str] | None = None,
) -> Settings:
    """Settings from defaults, the TOML file, the environment and flags, in order;
    with ``only``, those alone are checked (the others keep their values)."""
    environ = os.environ if env is None else env
    settings = Settings()
    config_file = getattr(args, "config", None) if args else None
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    if config_file is not None:
        toml = from_toml(Path(config_file))
        settings = settings.merged(toml, str(config_file), typed=True)
    settings = settings.merged(from_environment(environ), "environment")
    if args is not None:
        given = {n: getattr(args, n, None) for n in Settings.names()}
        flags = {n: v for n, v in given.items() if v is not None}
        settings = settings.merged(flags, "flag")
    check(settings, only)
    return settings


# What each setting may hold; `check` refuses anything else before the service starts.
AT_LEAST_ONE = (
    "workers",
    "database_pool_size",
    "max_batch_fixes",
    "flush_max_fixes",
    "commits_in_flight",
    "max_pending_fixes",
    "event_queue_max",
    "event_stream_partitions",
    "max_concurrent_streams",
    "max_watchers",
    "route_off_route_fixes",
    "route_back_on_route_fixes",
    "route_load_page",
)
ABOVE_ZERO = (
    "fanout_interest_ttl_s",  # the heartbeat runs every ttl / 3: at 0 it never pauses
    "database_timeout_s",
    "write_timeout_s",
    "max_token_lifetime_s",
    "routing_max_snap_m",
    "route_off_route_m",
    "route_arrival_radius_m",
    "route_checkpoint_s",
)
ZERO_OR_MORE = (
    "max_waiting_batch_fixes",
    "max_future_skew_s",
    "max_fix_age_s",
    "flush_interval_ms",
    "database_flush_interval_ms",
    "live_write_interval_ms",
    "processor_interval_ms",
    "dwell_lateness_s",
    "route_eta_change_s",
    "retention_days",
    "activity_checkpoint_s",
    "stream_window_kb",
    "default_precision_m",
)
# Upper bounds, where a larger value would overflow a store's integers or switch a
# protection off: a century of history, a token valid for a year.
AT_MOST = {
    "retention_days": (36_500, "days (a century)"),
    "max_token_lifetime_s": (366 * 86_400.0, "seconds (a year)"),
    "default_precision_m": (1_000_000.0, "metres"),
    "event_stream_partitions": (1_024, "streams (a WatchEvents process reads each)"),
}
CHOICES = {
    "sqlite_synchronous": ("OFF", "NORMAL", "FULL", "EXTRA"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "log_format": ("AUTO", "TEXT", "JSON"),
    "auth_mode": ("OFF", "JWT"),
}
FILES = ("jwt_rs256_public_key_file", "activity_config")
MAX_PORT = 65_535
DATABASE_SCHEMES = ("postgresql", "postgres")  # or a key=value connection string
REDIS_SCHEMES = ("redis", "rediss", "unix")
MIN_HS256_SECRET_BYTES = 32  # RFC 7518, section 3.2


def check(settings: Settings, only: Collection[str] | None = None) -> None:
    """Refuse settings the service cannot run with, naming the setting and why; with
    ``only``, those settings alone (a one-off command sharing the server's file
    and environment need not have the server's key file, say)."""
    if only is not None:
        settings = replace(
            Settings(), **{name: getattr(settings, name) for name in only}
        )
    _check_address(settings.listen, "listen")
    _check_urls(settings)
    if settings.metrics_listen:
        _check_address(settings.metrics_listen, "metrics_listen")
    for name in AT_LEAST_ONE:
        if getattr(settings, name) < 1:
            raise InvalidArgument(name, "must be at least 1")
    for name in ABOVE_ZERO:
        if not 0 < getattr(settings, name) < math.inf:
            raise InvalidArgument(name, "must be a finite number above 0")
    for name in ZERO_OR_MORE:
        if not 0 <= getattr(settings, name) < math.inf:
            raise InvalidArgument(name, "must be a finite number, 0 or more")
    for name, (most, unit) in AT_MOST.items():
        if getattr(settings, name) > most:
            raise InvalidArgument(name, f"must be at most {most:g} {unit}")
    if 0 < settings.default_precision_m < 1:  # core.precision.MIN_PRECISION_M
        raise InvalidArgument(
            "default_precision_m", "must be 0 (exact) or at least 1 metre"
        )
    tenant = settings.default_tenant
    if not tenant.strip() or len(tenant) > 256 or not tenant.isprintable():
        raise InvalidArgument(
            "default_tenant", "must be printable, not blank, at most 256 characters"
        )
    if not 0 <= settings.trace_sample_ratio <= 1:
        raise InvalidArgument("trace_sample_ratio", "must be in [0, 1]")
    secret = settings.jwt_hs256_secret
    if secret and len(secret.encode()) < MIN_HS256_SECRET_BYTES:
        raise InvalidArgument(
            "jwt_hs256_secret",
            f"must be at least {MIN_HS256_SECRET_BYTES} bytes (a key shorter than "
            "HS256's 256-bit hash can be guessed offline from one token)",
        )
    for name, allowed in CHOICES.items():
        if getattr(settings, name).upper() not in allowed:
            choices = ", ".join(a.lower() for a in allowed)
            raise InvalidArgument(name, f"must be one of {choices}")
    for name in FILES:
        path = getattr(settings, name)
        if path and not os.access(path, os.R_OK):
            raise InvalidArgument(name, f"cannot read {path}")
        if path and not Path(path).is_file():
            raise InvalidArgument(name, f"{path} is not a file")


def _check_urls(settings: Settings) -> None:
    """The database and Redis URLs parse as what they are meant to be; whether the
    servers answer is found out when the service connects."""
    database = settings.database_url
    if database:
        scheme = urlsplit(database).scheme if "://" in database else ""
        if "://" in database and scheme not in DATABASE_SCHEMES:
            raise InvalidArgument(
                "database_url", f"expected postgresql://..., got a {scheme}:// URL"
            )
        try:
            conninfo_to_dict(database)
        except psycopg.ProgrammingError as exc:
            raise InvalidArgument(
                "database_url", f"not a PostgreSQL URL: {exc}"
            ) from exc
    redis_url = settings.redis_url
    scheme = urlsplit(redis_url).scheme
    if redis_url and scheme not in REDIS_SCHEMES:
        got = f"a {scheme}:// URL" if scheme else "no scheme"  # not the password
        raise InvalidArgument(
            "redis_url", f"expected redis://, rediss:// or unix://, got {got}"
        )


def _check_address(address: str, name: str) -> None:
    """host:port with a port in [0, 65535] (0: any free port)."""
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit() and port.isascii()):
        raise InvalidArgument(name, f"expected host:port, got {address!r}")
    if int(port) > MAX_PORT:
        raise InvalidArgument(name, f"port {port} is not in [0, {MAX_PORT}]")
