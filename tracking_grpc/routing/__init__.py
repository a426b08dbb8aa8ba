"""Road routing: OSRM datasets and engines, stop-order optimisation, route monitoring.

datasets      prepare and find OSRM (MLD) datasets, one per profile
engine        routes, tables, snapping and map matching on a loaded dataset
geometry      coordinate checks and along-route arithmetic on arrays
optimise      vehicle/job assignment and stop order through VROOM
learning      travel-time factors learned from observed trips
monitor       progress, ETA and off-route events of devices on planned routes
"""
