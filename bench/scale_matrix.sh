#!/bin/sh
# The scaled-down runs behind bench/capacity.py: device streams (1 fix / 5 s and,
# streams10, 1 fix / 10 s, to tell per-process from per-fix costs) and gateways at
# 1, 2 and 4 server processes on a one-master Redis Cluster, and at 1 and 2 processes on a
# three-master one, and at 1 process on a standalone Redis (r0: the shared one at
# --redis-url, to price the cluster client); production backends (a private PostgreSQL server and a private
# Redis Cluster per run, so their CPU is this run's alone), 1,000 fences.
#
#   bench/scale_matrix.sh                  # every point
#   bench/scale_matrix.sh streams_w4_r1    # one point, by name
#   LOCK=/path/to/bench.lock bench/scale_matrix.sh   # each run under flock
#
# Results: bench/results/load_scale_<point>.json (same names every time, so a rerun
# replaces them and bench/capacity.py reads the newest).
set -eu
cd "$(dirname "$0")/.."
PY=.venv/bin/python
COMMON="--production --private-postgres --observer --fences 1000 --watch-devices 100"
COMMON="$COMMON --idle-s 5"
STREAMS="--devices 5000 --interval-s 5 --drivers 2 --ramp-s 15 --settle-s 10 --steady-s 35"
STREAMS="$STREAMS --streams-per-channel 250"
STREAMS10="--devices 5000 --interval-s 10 --drivers 2 --ramp-s 15 --settle-s 10 --steady-s 35"
STREAMS10="$STREAMS10 --streams-per-channel 250"
GATEWAYS="--devices 0 --gateways 8 --gateway-rate 1 --gateway-batch 500"
GATEWAYS="$GATEWAYS --gateway-devices 5000 --drivers 2 --ramp-s 0 --settle-s 5 --steady-s 30"
POINTS="streams_w1_r1 streams_w2_r1 streams_w4_r1"
POINTS="$POINTS streams10_w1_r1 streams10_w2_r1 streams10_w4_r1"
POINTS="$POINTS gateway_w1_r1 gateway_w2_r1 gateway_w4_r1"
POINTS="$POINTS streams_w1_r3 streams_w2_r3 gateway_w1_r3 gateway_w2_r3"
POINTS="$POINTS streams_w1_r0 gateway_w1_r0"

run() {
    point=$1
    kind=${point%%_*}
    rest=${point#*_w}
    workers=${rest%%_r*}
    shards=${rest#*_r}
    case $kind in
        streams) load=$STREAMS ;;
        streams10) load=$STREAMS10 ;;
        *) load=$GATEWAYS ;;
    esac
    # shellcheck disable=SC2086
    set -- $PY bench/load.py $load $COMMON --workers "$workers" \
        --redis-shards "$shards" --name "scale_$point"
    echo "== $point: $*"
    if [ -n "${LOCK:-}" ]; then
        flock "$LOCK" "$@"
    else
        "$@"
    fi
}

for point in ${*:-$POINTS}; do
    run "$point"
done
