"""What an operator sees: metrics, traces and logs.

:func:`configure` sets all three up from the settings at process start; the
modules :mod:`.metrics` and :mod:`.tracing` hold the functions the rest of the
service calls, each cheap while its part is off.
"""

from __future__ import annotations

from typing import TextIO

from tracking_grpc.config import Settings
from tracking_grpc.observability import logs, metrics, tracing


def configure(settings: Settings, stream: TextIO | None = None) -> None:
    """Logs, tracing and (in this process) metrics recording, as the settings say."""
    logs.configure(settings, stream)
    tracing.configure(settings)
    if settings.metrics_listen:
        metrics.enable()
    else:
        metrics.disable()
