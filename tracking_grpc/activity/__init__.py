"""Activity: clean tracks, motion, stops and trips, live events and history.

Modules by operation family: :mod:`.clean` (outliers, derived speed and heading),
:mod:`.smooth` (Kalman filter and smoother), :mod:`.stops` (stop windows),
:mod:`.motion` (motion state), :mod:`.track` (one pass over a batch),
:mod:`.segments` (trips and stops with statistics), :mod:`.processor` (live
events), :mod:`.patterns` (daily summaries, places, heatmaps) and
:mod:`.export` (GPX, GeoJSON, CSV). Rules and defaults: :mod:`.params`.
"""
