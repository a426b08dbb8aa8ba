"""Stop detection: where a device stayed within a radius for a minimum time.

A *window* starts at a fix and grows over the following fixes of the device as
long as they all fit in a circle of ``stop_radius_m`` around the centre of their
bounding box. A window spanning at least ``min_stop_s`` is a stop window; a stop
is a maximal chain of overlapping stop windows. Windows are grown for all fixes
at once by binary lifting over a sparse table of box bounds (``log2(n)`` array
passes), so no Python loop runs per fix.

A fix's stop flag is *final* once no window that could still change it is open:
either a stop window covers it, or every window starting at or before it has
been closed by a fix outside its circle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracking_grpc.activity.groups import Groups

EDGE_SPREADS = 4.0
MIN_EDGE_M = 15.0


@dataclass(frozen=True, slots=True)
class StopFlags:
    in_stop: np.ndarray  # bool per fix
    stop_id: np.ndarray  # int per fix: increases at each new stop; -1 outside stops
    final: np.ndarray  # bool per fix: the flag cannot change with later fixes
    open_region: np.ndarray  # bool per fix: at or after the device's first open window


def _window_ends(x: np.ndarray, y: np.ndarray, groups: Groups, radius_m: float):
    """Index of the last fix of the widest compact window starting at each fix."""
    n = x.shape[0]
    limit = groups.row_end() - 1
    levels = [(x, x, y, y)]
    span = 1
    longest = int((groups.ends - groups.starts).max())
    while span * 2 <= longest:
        lo_x, hi_x, lo_y, hi_y = levels[-1]
        shifted = np.minimum(np.arange(n) + span, n - 1)
        levels.append(
            (
                np.minimum(lo_x, lo_x[shifted]),
                np.maximum(hi_x, hi_x[shifted]),
                np.minimum(lo_y, lo_y[shifted]),
                np.maximum(hi_y, hi_y[shifted]),
            )
        )
        span *= 2
    # Grow each window by blocks of 2^k, largest first, while it stays compact.
    end = np.arange(n)
    min_x, max_x, min_y, max_y = x.copy(), x.copy(), y.copy(), y.copy()
    limit_sq = (2.0 * radius_m) ** 2
    for k in range(len(levels) - 1, -1, -1):
        block = 1 << k
        start = end + 1
        can = start + block - 1 <= limit
        s = np.where(can, start, 0)
        lx, hx, ly, hy = levels[k]
        nx0 = np.minimum(min_x, lx[s])
        nx1 = np.maximum(max_x, hx[s])
        ny0 = np.minimum(min_y, ly[s])
        ny1 = np.maximum(max_y, hy[s])
        ok = can & ((nx1 - nx0) ** 2 + (ny1 - ny0) ** 2 <= limit_sq)
        end = np.where(ok, end + block, end)
        min_x = np.where(ok, nx0, min_x)
        max_x = np.where(ok, nx1, max_x)
        min_y = np.where(ok, ny0, min_y)
        max_y = np.where(ok, ny1, max_y)
    return end


def detect_stops(
    time_ms: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    groups: Groups,
    radius_m: float,
    min_stop_s: float,
    complete: bool,
) -> StopFlags:
    """Stop flags of trusted fixes sorted by device, then time (x, y in metres)."""
    n = time_ms.shape[0]
    if n == 0:
        empty = np.zeros(0, dtype=bool)
        return StopFlags(empty, np.zeros(0, dtype=np.int64), empty, empty)
    end = _window_ends(x, y, groups, radius_m)
    core = (time_ms[end] - time_ms) >= min_stop_s * 1000.0

    # Coverage: the furthest end of any stop window started at or before a fix.
    reach = np.where(core, end, -1)
    row_start = groups.row_start()
    running = np.maximum.accumulate(reach)  # earlier devices end before row_start
    running = np.where(running >= row_start, running, -1)
    idx = np.arange(n)
    in_stop = running >= idx

    # A new stop begins at a stop window that no earlier window reaches.
    before = np.empty(n, dtype=np.int64)
    before[0] = -1
    before[1:] = running[:-1]
    before = np.where(groups.first, -1, before)
    new_stop = core & (before < idx)
    stop_id = np.cumsum(new_stop) - 1
    stop_id = np.where(in_stop, stop_id, -1)

    in_stop, stop_id, unsure = _trim_edges(x, y, in_stop, stop_id, groups, complete)
    reaches_end = end == groups.row_end() - 1
    any_open = np.minimum.reduceat(np.where(reaches_end, idx, n), groups.starts)
    open_region = idx >= any_open[groups.index]
    if complete:
        final = np.ones(n, dtype=bool)
    else:
        # Open windows reach the device's last fix and could still become stops.
        open_window = (end == groups.row_end() - 1) & ~core
        first_open = np.minimum.reduceat(np.where(open_window, idx, n), groups.starts)[
            groups.index
        ]
        final = (in_stop | (idx < first_open)) & ~unsure
    return StopFlags(in_stop, stop_id, final, open_region)


def _per_stop_median(values: np.ndarray, stop: np.ndarray, count: int) -> np.ndarray:
    order = np.lexsort((values, stop))
    starts = np.searchsorted(stop[order], np.arange(count))
    sizes = np.bincount(stop, minlength=count)
    return values[order[starts + (sizes - 1) // 2]]


def _trim_edges(x, y, in_stop, stop_id, groups: Groups, complete: bool):
    """Drop a stop's leading and trailing fixes that lie off its centre.

    Windows reach up to twice the radius, so without this a stop would swallow the
    first and last ``2 * stop_radius_m`` of the trips around it. A fix belongs to
    the stop's edge when it lies further from the stop's median position than
    ``EDGE_SPREADS`` times the median distance of its fixes (at least
    ``MIN_EDGE_M``). The trailing edge of a stop still open at the end of live data
    is *unsure* until the stop closes.
    """
    rows = np.flatnonzero(in_stop)
    unsure = np.zeros(in_stop.shape[0], dtype=bool)
    if rows.size == 0:
        return in_stop, stop_id, unsure
    sid = stop_id[rows] - stop_id[rows].min()
    count = int(sid.max()) + 1
    cx = _per_stop_median(x[rows], sid, count)
    cy = _per_stop_median(y[rows], sid, count)
    dist = np.hypot(x[rows] - cx[sid], y[rows] - cy[sid])
    edge = np.maximum(EDGE_SPREADS * _per_stop_median(dist, sid, count), MIN_EDGE_M)
    near = dist <= edge[sid]
    marked = np.where(near, rows, -1)
    last_near = np.full(count, -1)
    np.maximum.at(last_near, sid, marked)
    first_near = np.full(count, np.iinfo(np.int64).max)
    np.minimum.at(first_near, sid, np.where(near, rows, np.iinfo(np.int64).max))
    last_row = np.full(count, -1)
    np.maximum.at(last_row, sid, rows)
    still_open = last_row == groups.row_end()[last_row] - 1
    lead = rows < first_near[sid]
    trail = rows > last_near[sid]
    if not complete:
        unsure[rows[trail & still_open[sid]]] = True
        trail &= ~still_open[sid]
    drop = rows[lead | trail]
    in_stop = in_stop.copy()
    stop_id = stop_id.copy()
    in_stop[drop] = False
    stop_id[drop] = -1
    return in_stop, stop_id, unsure
