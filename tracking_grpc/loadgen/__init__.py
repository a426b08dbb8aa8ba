"""Load generation: simulated devices, gateways and watchers with in-band latency.

``bench/load.py`` is the program; these modules are the parts it (and the smoke test)
reuse: :mod:`plan` (what one driver process does), :mod:`device`, :mod:`gateway` and
:mod:`watcher` (the simulated clients), :mod:`driver` (one driver process),
:mod:`stats` (percentiles and the summary) and :mod:`procstat` (server CPU and memory).
"""
