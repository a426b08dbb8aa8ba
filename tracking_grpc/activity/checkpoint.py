"""Checkpoints of live activity: each device's state packed for the history store.

A checkpoint is one fixed-size record per device: the processor's scalar columns
(odometer, stop, trip, motion, overspeed, last applied fix...), the Kalman filter's
state, and the fix time the device's tail of recent fixes starts at. The tail
itself is not saved: a restore reads it back from stored history, from that time
on. :class:`Codec` packs and unpacks many devices at once; :class:`CheckpointWriter`
saves the devices that changed every ``activity_checkpoint_s`` and at a clean stop.

>>> import numpy as np
>>> codec = Codec(1, {"odometer": (np.float64, 0.0)})
>>> records = codec.unpack(codec.pack({"odometer": np.array([12.5])}, np.array([7])))
>>> records["odometer"].tolist(), records["tail_ms"].tolist()
([12.5], [7])
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from tracking_grpc.errors import Unavailable

if TYPE_CHECKING:
    from tracking_grpc.activity.processor import ActivityProcessor

log = logging.getLogger(__name__)
# Between two checkpoint writes of a round: the acks' group commits get the
# database in between (a round of 10,000 devices takes about 1.3 s).
SAVE_PAUSE_S = 0.025

# The filter's state per slot (KalmanFilter's arrays): name -> values per device.
KALMAN_FIELDS = {
    "origin": 2,
    "time_ms": 1,
    "pos": 2,
    "vel": 2,
    "p_pp": 2,
    "p_pv": 2,
    "p_vv": 2,
}


class Codec:
    """Packs columns of device state into one little-endian record per device."""

    def __init__(self, version: int, columns: Mapping[str, tuple]) -> None:
        fields: list[tuple] = [("version", "<u2"), ("tail_ms", "<i8")]
        for name, (dtype, _) in columns.items():
            fields.append((name, np.dtype(dtype).newbyteorder("<")))
        for name, width in KALMAN_FIELDS.items():
            kind = "<i8" if name == "time_ms" else "<f8"
            fields.append((f"kalman_{name}", kind, () if width == 1 else (width,)))
        self.version = version
        self.columns = list(columns)
        self.dtype = np.dtype(fields)

    def pack(
        self,
        cols: Mapping[str, np.ndarray],
        tail_ms: np.ndarray,
        kalman: Mapping[str, np.ndarray] | None = None,
    ) -> list[bytes]:
        """One record per row of the given (already selected) columns."""
        records = np.zeros(len(tail_ms), dtype=self.dtype)
        records["version"] = self.version
        records["tail_ms"] = tail_ms
        for name in self.columns:
            records[name] = cols[name]
        for name, values in (kalman or {}).items():
            records[f"kalman_{name}"] = values
        raw, size = records.tobytes(), self.dtype.itemsize
        return [raw[i * size : (i + 1) * size] for i in range(len(records))]

    def unpack(self, states: list[bytes]) -> np.ndarray:
        """The records of ``states``; one of another version or size is all zero
        with version 0 (the caller starts that device afresh)."""
        size = self.dtype.itemsize
        good = [len(s) == size for s in states]
        raw = b"".join(
            s if ok else bytes(size) for s, ok in zip(states, good, strict=True)
        )
        records = np.frombuffer(raw, dtype=self.dtype).copy()
        stale = records["version"] != self.version
        records[stale] = np.zeros(1, dtype=self.dtype)
        return records


class CheckpointWriter:
    """Saves the activity of devices that changed, every ``interval_s``, off the
    path of acknowledgements, and once more at a clean stop."""

    def __init__(self, processor: ActivityProcessor, interval_s: float) -> None:
        self.processor = processor
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="activity-checkpoints")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                saved = await self.processor.save_checkpoints(SAVE_PAUSE_S)
                log.debug("saved the activity of %d devices", saved)
            except Unavailable as exc:  # kept: the next round saves them
                log.warning("activity checkpoints not saved: %s", exc.message)
            except Exception:
                log.exception("saving activity checkpoints failed")

    async def stop(self, deadline: float | None = None) -> None:
        """Stop the rounds and save what changed since the last one (the pipeline
        has applied its last fixes by now)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        timeout = None
        if deadline is not None:
            timeout = max(deadline - asyncio.get_running_loop().time(), 1.0)
        try:
            saved = await asyncio.wait_for(self.processor.save_checkpoints(), timeout)
            log.info("saved the activity of %d devices at stop", saved)
        except (Unavailable, TimeoutError) as exc:
            log.warning("activity checkpoints not saved at stop: %r", exc)
