"""Cleaning: which fixes to trust, and values derived along the trusted track.

A step between consecutive fixes of a device is a *jump* when it implies a speed
above ``max_speed_mps`` (plus ``jump_slack_m``) and the fixes are less than
``outlier_reset_s`` apart. Jumps cut the track into runs of mutually consistent
fixes. A run that follows a jump is an outlier while it holds fewer than
``reanchor_fixes`` fixes and another jump ends it; a short run at the end of the
data is *pending* until more fixes show whether the device really moved there.
A long silence never leaves the device locked to its old position: after
``outlier_reset_s`` any step is accepted. Fixes at (0, 0), fixes with accuracy
worse than ``max_accuracy_m`` and a second fix with the same fix time as the one
before it are never trusted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracking_grpc.activity.geodesy import azimuth_deg, distance_m
from tracking_grpc.activity.groups import Groups, previous_where
from tracking_grpc.activity.params import ActivityParams


@dataclass(frozen=True, slots=True)
class Trust:
    trusted: np.ndarray  # bool: use this fix
    pending: np.ndarray  # bool: not decided yet (a short run after a jump at the end)


def _steps(time_ms, lat, lon, groups: Groups):
    n = time_ms.shape[0]
    dist = np.zeros(n)
    dt_s = np.zeros(n)
    has_prev = ~groups.first
    i = np.flatnonzero(has_prev)
    dist[i] = distance_m(lat[i - 1], lon[i - 1], lat[i], lon[i])
    dt_s[i] = (time_ms[i] - time_ms[i - 1]) / 1000.0
    return dist, dt_s, has_prev


def mark_outliers(
    time_ms: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    accuracy_m: np.ndarray,
    groups: Groups,
    params: ActivityParams,
    complete: bool,
) -> Trust:
    """Trusted and pending fixes of rows sorted by device, then time.

    With ``complete`` the data ends here for good (a history query): a short run
    after a jump at the end is an outlier instead of pending.
    """
    n = time_ms.shape[0]
    usable = ~((lat == 0.0) & (lon == 0.0))
    usable &= ~(accuracy_m > params.max_accuracy_m)  # NaN accuracy passes
    # A second fix with the same fix time is a duplicate, as the store treats it.
    usable[1:] &= ~((time_ms[1:] == time_ms[:-1]) & ~groups.first[1:])
    rows = np.flatnonzero(usable)
    trusted = np.zeros(n, dtype=bool)
    pending = np.zeros(n, dtype=bool)
    if rows.size == 0:
        return Trust(trusted, pending)

    sub = Groups.of(groups.index[rows])
    t, la, lo = time_ms[rows], lat[rows], lon[rows]
    dist, dt_s, has_prev = _steps(t, la, lo, sub)
    jump = has_prev & _implausible(dist, dt_s, params)
    run_id = np.cumsum(jump | sub.first) - 1
    starts = np.flatnonzero(jump | sub.first)
    ends = np.append(starts[1:], rows.size)
    moved = np.append(True, dist[1:] > 0) | sub.first
    weight = np.add.reduceat(moved.astype(np.int64), starts)
    anchor = (weight >= params.reanchor_fixes) | ~jump[starts]

    if complete:
        keep_run = _best_chains(
            starts, ends, weight, jump, sub.index, t, la, lo, params
        )
        pending_run = np.zeros(starts.size, dtype=bool)
    else:
        keep_run, pending_run = _live_runs(
            starts, ends, anchor, sub.index, t, la, lo, params
        )

    keep = keep_run[run_id]
    trusted[rows] = keep
    pending[rows] = pending_run[run_id]
    return Trust(trusted, pending)


def _live_runs(starts, ends, anchor, group_of_row, t, la, lo, params):
    """Runs to keep and runs still pending, deciding as fixes arrive."""
    keep_run = anchor.copy()
    pending_run = np.zeros(starts.size, dtype=bool)
    # Short runs after a jump are rare: judge them one by one against the last
    # kept fix before them.
    for r in np.flatnonzero(~anchor):
        first = starts[r]
        last = _last_kept(r, starts, ends, keep_run, group_of_row)
        if last >= 0 and not _implausible(
            distance_m(la[last], lo[last], la[first], lo[first]),
            (t[first] - t[last]) / 1000.0,
            params,
        ):
            keep_run[r] = True
            continue
        follows = (
            r + 1 < starts.size and group_of_row[starts[r + 1]] == group_of_row[first]
        )
        pending_run[r] = not follows
    return keep_run, pending_run


def _best_chains(starts, ends, weight, jump, group_of_row, t, la, lo, params):
    """Runs on the heaviest chain of each device whose links are all plausible.

    With hindsight (a history query) the track is the chain of runs, joined by
    plausible steps, that holds the most distinct positions; a cluster of wrong
    positions loses to the track around it however long it lasts.
    """
    keep_run = np.ones(starts.size, dtype=bool)
    run_group = group_of_row[starts]
    jumpy = np.unique(run_group[jump[starts]])
    window = 32  # runs looked back at; jumps are rare in real tracks
    for group in jumpy:
        members = np.flatnonzero(run_group == group)
        first_rows = starts[members]
        last_rows = ends[members] - 1
        best = weight[members].astype(np.float64)
        back = np.full(members.size, -1)
        for k in range(1, members.size):
            lo_k = max(0, k - window)
            q = np.arange(lo_k, k)
            ok = ~_implausible(
                distance_m(
                    la[last_rows[q]],
                    lo[last_rows[q]],
                    np.full(q.size, la[first_rows[k]]),
                    np.full(q.size, lo[first_rows[k]]),
                ),
                (t[first_rows[k]] - t[last_rows[q]]) / 1000.0,
                params,
            )
            if ok.any():
                candidates = np.where(ok, best[q], -1.0)
                j = int(np.argmax(candidates))
                best[k] += candidates[j]
                back[k] = q[j]
        chosen = np.zeros(members.size, dtype=bool)
        k = int(np.argmax(best))
        while k >= 0:
            chosen[k] = True
            k = int(back[k])
        keep_run[members] = chosen
    return keep_run


def _implausible(dist_m, dt_s, params: ActivityParams):
    allowed = params.max_speed_mps * dt_s + params.jump_slack_m
    return (dist_m > allowed) & (dt_s < params.outlier_reset_s)


def _last_kept(r, starts, ends, keep_run, group_of_row) -> int:
    """Row of the last fix of the nearest kept run before run r (same device)."""
    group = group_of_row[starts[r]]
    for q in range(r - 1, -1, -1):
        if group_of_row[starts[q]] != group:
            return -1
        if keep_run[q]:
            return int(ends[q] - 1)
    return -1


@dataclass(frozen=True, slots=True)
class Steps:
    """Per trusted fix: the step from the previous trusted fix of the device."""

    prev: np.ndarray  # index of the previous trusted fix, -1 for none
    dist_m: np.ndarray
    dt_s: np.ndarray
    speed_mps: np.ndarray  # reported if plausible, else derived; NaN when unknown
    jump: np.ndarray  # an implausible step between two trusted runs


def derive_steps(
    time_ms, lat, lon, speed_mps, trusted, groups: Groups, params
) -> Steps:
    """Steps along the trusted track, with speed filled where absent or
    implausible (above ``max_speed_mps``).

    A zero time step has no derived speed (never a division by zero).
    """
    n = time_ms.shape[0]
    prev = np.where(trusted, previous_where(trusted, groups), -1)
    dist = np.zeros(n)
    dt_s = np.zeros(n)
    i = np.flatnonzero(prev >= 0)
    p = prev[i]
    dist[i] = distance_m(lat[p], lon[p], lat[i], lon[i])
    dt_s[i] = (time_ms[i] - time_ms[p]) / 1000.0

    derived = np.full(n, np.nan)
    moving = dt_s > 0
    derived[moving] = dist[moving] / dt_s[moving]
    jump = (prev >= 0) & _implausible(dist, dt_s, params)
    derived[jump] = np.nan
    reported = np.asarray(speed_mps, dtype=np.float64)
    # A reported speed the track could not reach (above max_speed_mps, what makes
    # a step a jump) is a receiver's glitch: the step's own speed stands instead.
    plausible = np.isfinite(reported) & (reported >= 0)
    plausible &= reported <= params.max_speed_mps
    speed = np.where(plausible, reported, derived)
    return Steps(prev, dist, dt_s, speed, jump)


def derive_headings(lat, lon, heading_deg, steps: Steps) -> np.ndarray:
    """Reported heading, else the bearing of the step to the fix (at least 2 m)."""
    heading = np.full(lat.shape[0], np.nan)
    i = np.flatnonzero((steps.prev >= 0) & (steps.dist_m >= 2.0))
    p = steps.prev[i]
    heading[i] = azimuth_deg(lat[p], lon[p], lat[i], lon[i])
    reported = np.asarray(heading_deg, dtype=np.float64)
    return np.where(np.isfinite(reported), reported, heading)
