"""Fences for a load run: irregular polygons of 50-500 m where the devices roam."""

from __future__ import annotations

import json

import numpy as np

M_PER_DEG_LAT = 111_320.0


def polygon_features(
    count: int, center: tuple[float, float], spread_deg: float, seed: int = 7
) -> str:
    """A GeoJSON FeatureCollection of ``count`` star-shaped polygons (ImportFences)."""
    rng = np.random.default_rng(seed)
    lat0 = center[0] + rng.uniform(-spread_deg, spread_deg, count)
    lon0 = center[1] + rng.uniform(-spread_deg, spread_deg, count)
    radius_m = rng.uniform(50.0, 500.0, count)
    features = []
    for i in range(count):
        corners = int(rng.integers(6, 16))
        angle = np.sort(rng.uniform(0, 2 * np.pi, corners))
        reach_m = radius_m[i] * rng.uniform(0.5, 1.0, corners)
        dlat = reach_m * np.sin(angle) / M_PER_DEG_LAT
        dlon = reach_m * np.cos(angle) / (M_PER_DEG_LAT * np.cos(np.radians(lat0[i])))
        ring = np.column_stack([lon0[i] + dlon, lat0[i] + dlat]).round(7).tolist()
        features.append(
            {
                "type": "Feature",
                "id": f"load-fence-{i:05d}",
                "properties": {"name": f"load fence {i}"},
                "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
            }
        )
    return json.dumps({"type": "FeatureCollection", "features": features})
