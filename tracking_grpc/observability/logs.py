"""Log output: JSON lines in production, readable text on a terminal.

Every module logs through its own ``logging.getLogger(__name__)``; this module only
decides how records look. A JSON line has exactly the fields in :data:`FIELDS`
(absent ones are null). ``rpc`` is set by the server interceptor; servicers add
``device`` and ``tenant`` with :func:`bind`, or per line with ``extra=``. Trace and
span ids come from the span open where the line was written.

Messages are scrubbed of bearer tokens, JWTs, passwords in URLs and the configured
secrets before they are written. Per-fix detail belongs at debug, never at info.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from tracking_grpc.config import Settings
from tracking_grpc.observability import tracing

FIELDS = (
    "time",
    "level",
    "logger",
    "message",
    "rpc",
    "device",
    "tenant",
    "trace_id",
    "span_id",
    "latency_ms",
)
CONTEXT_FIELDS = ("rpc", "device", "tenant")
REDACTED = "[redacted]"

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "tracking_log_context", default=None
)
_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s,;'\"]+"),
    re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"),
    re.compile(r"(?i)((?:password|passwd|secret|token)\s*[=:]\s*)[^\s,;&'\"]+"),
    re.compile(r"(\b[a-z][\w+.-]*://[^\s:/@]*:)[^\s@/]+(@)"),
)


def bind(**fields: str) -> None:
    """Add context fields (device, tenant, rpc) to every later line of this task.

    Each RPC runs in its own task, so what a servicer binds ends with its call.
    """
    _context.set({**(_context.get() or {}), **fields})


@contextlib.contextmanager
def fields(**values: str) -> Iterator[None]:
    """Add context fields for the lines written inside the ``with`` block only."""
    token = _context.set({**(_context.get() or {}), **values})
    try:
        yield
    finally:
        _context.reset(token)


def bound() -> dict[str, str]:
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Copies the task's context and the current span's ids onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_context.get() or {}).items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        if getattr(record, "trace_id", None) is None:
            record.trace_id, record.span_id = tracing.ids()
        return True


class Redactor:
    """Removes tokens, passwords and the configured secrets from text."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self.secrets = tuple(s for s in secrets if len(s) >= 4)

    def __call__(self, text: str) -> str:
        for pattern in _PATTERNS:
            text = pattern.sub(_keep_prefix, text)
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


def _keep_prefix(match: re.Match[str]) -> str:
    groups = [g for g in match.groups() if g is not None]
    if not groups:
        return REDACTED
    suffix = groups[1] if len(groups) > 1 else ""
    return groups[0] + REDACTED + suffix


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the fields of :data:`FIELDS`."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self.redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        line: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(message),
        }
        for name in FIELDS[4:]:
            value = getattr(record, name, None)
            line[name] = value if value != "" else None
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message [rpc=... device=... trace=...]`` for people."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [
            f"{name}={value}"
            for name in ("rpc", "device", "tenant", "latency_ms", "trace_id")
            if (value := getattr(record, name, None)) not in (None, "")
        ]
        if extras:
            text += " [" + " ".join(extras) + "]"
        return self.redact(text)


def _iso_time(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def choose_format(setting: str, stream: TextIO) -> str:
    """``json`` or ``text``: ``auto`` means text on a terminal, JSON otherwise."""
    if setting not in {"auto", "text", "json"}:
        raise ValueError(f"log_format must be auto, text or json, not {setting!r}")
    if setting != "auto":
        return setting
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


_handler: logging.Handler | None = None


def configure(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Install one handler on the root logger, formatted as ``log_format`` says."""
    global _handler
    stream = stream if stream is not None else sys.stderr
    redact = Redactor(_secrets(settings))
    kind = choose_format(settings.log_format, stream)
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(
        JsonFormatter(redact) if kind == "json" else TextFormatter(redact)
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    warnings.showwarning = _log_warning
    _handler = handler
    return handler


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Show a Python warning (a library's RuntimeWarning, say) as a log line of the
    ``py.warnings`` logger, formatted like every other line, not as raw text on
    standard error. ``logging.captureWarnings(True)`` installs its hook only while
    it has none recorded: once something else has put ``warnings.showwarning``
    back (pytest does after each test), a later ``configure`` would not route
    warnings again; this hook is installed by every ``configure``."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    logging.getLogger("py.warnings").warning("%s", text.rstrip())


def _secrets(settings: Settings) -> tuple[str, ...]:
    found = [settings.jwt_hs256_secret]
    for url in (settings.database_url, settings.redis_url):
        match = re.search(r"://[^\s:/@]*:([^\s@/]+)@", url)
        if match:
            found.append(match.group(1))
    return tuple(s for s in found if s)
