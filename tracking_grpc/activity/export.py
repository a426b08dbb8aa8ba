"""Tracks as documents: GPX 1.1, GeoJSON (a LineString feature plus points) and CSV.

Each writer yields the document in pieces of about ``CHUNK_FIXES`` fixes so that a
long track streams without being held twice in memory.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from tracking_grpc.core.fixes import FixBatch

CHUNK_FIXES = 5_000
CONTENT_TYPES = {
    "gpx": "application/gpx+xml",
    "geojson": "application/geo+json",
    "csv": "text/csv",
}


def _iso(time_ms: np.ndarray) -> list[str]:
    return [
        dt.datetime.fromtimestamp(t / 1000, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
        for t in time_ms.tolist()
    ]


def _chunks(fixes: FixBatch) -> Iterator[FixBatch]:
    for start in range(0, len(fixes), CHUNK_FIXES):
        yield fixes.take(np.arange(start, min(start + CHUNK_FIXES, len(fixes))))


def gpx(fixes: FixBatch, name: str) -> Iterator[str]:
    yield (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<gpx version="1.1" creator="tracking-grpc" '
        'xmlns="http://www.topografix.com/GPX/1/1">\n'
        f"<trk><name>{escape(name)}</name><trkseg>\n"
    )
    for part in _chunks(fixes):
        lines = []
        for lat, lon, alt, when in zip(
            part.lat.tolist(),
            part.lon.tolist(),
            part.altitude_m.tolist(),
            _iso(part.time_ms),
            strict=True,
        ):
            ele = f"<ele>{alt:.2f}</ele>" if alt == alt else ""
            lines.append(
                f"<trkpt lat={quoteattr(f'{lat:.7f}')} lon={quoteattr(f'{lon:.7f}')}>"
                f"{ele}<time>{when}</time></trkpt>\n"
            )
        yield "".join(lines)
    yield "</trkseg></trk>\n</gpx>\n"


def geojson(fixes: FixBatch, name: str) -> Iterator[str]:
    """A FeatureCollection: the line, then one Point feature per fix with its time.
    A line needs two positions (RFC 7946): with fewer, its feature has no geometry
    (null), and the fix, if any, is its Point feature alone."""
    coords = np.column_stack([fixes.lon, fixes.lat]).round(7).tolist()
    line = {
        "type": "Feature",
        "properties": {"device_id": name, "fix_count": len(fixes)},
        "geometry": (
            {"type": "LineString", "coordinates": coords} if len(coords) > 1 else None
        ),
    }
    yield '{"type":"FeatureCollection","features":[' + json.dumps(line)
    for part in _chunks(fixes):
        pieces = []
        for lat, lon, seq, when, speed in zip(
            part.lat.tolist(),
            part.lon.tolist(),
            part.seq.tolist(),
            _iso(part.time_ms),
            part.speed_mps.tolist(),
            strict=True,
        ):
            properties = {"seq": seq, "time": when}
            if speed == speed:
                properties["speed_mps"] = round(speed, 3)
            pieces.append(
                json.dumps(
                    {
                        "type": "Feature",
                        "properties": properties,
                        "geometry": {
                            "type": "Point",
                            "coordinates": [round(lon, 7), round(lat, 7)],
                        },
                    }
                )
            )
        yield "," + ",".join(pieces) if pieces else ""
    yield "]}\n"


CSV_HEADER = "device_id,seq,time_utc,time_ms,lat,lon,accuracy_m,speed_mps,heading_deg\n"


# A cell starting with one of these is a formula to a spreadsheet (CSV injection);
# such a cell gets a leading apostrophe, which shows it as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """A text cell, quoted, and defused if a spreadsheet would run it."""
    if value.startswith(FORMULA_STARTS):
        value = "'" + value
    return '"' + value.replace('"', '""') + '"'


def csv(fixes: FixBatch, name: str) -> Iterator[str]:
    yield CSV_HEADER
    quoted = csv_text(name)
    for part in _chunks(fixes):
        lines = []
        for seq, when, t, lat, lon, acc, speed, heading in zip(
            part.seq.tolist(),
            _iso(part.time_ms),
            part.time_ms.tolist(),
            part.lat.tolist(),
            part.lon.tolist(),
            part.accuracy_m.tolist(),
            part.speed_mps.tolist(),
            part.heading_deg.tolist(),
            strict=True,
        ):
            extra = ",".join(
                "" if v != v else f"{v:.2f}" for v in (acc, speed, heading)
            )
            lines.append(f"{quoted},{seq},{when},{t},{lat:.7f},{lon:.7f},{extra}\n")
        yield "".join(lines)


WRITERS = {"gpx": gpx, "geojson": geojson, "csv": csv}
