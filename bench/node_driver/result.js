'use strict';
// The plan's window and the driver's result, shaped like plan.py's Window and
// DriverResult so that bench/load.py turns the JSON back into a DriverResult.

const { nowMs } = require('./clock');

class Window {
  constructor({ start_s, ramp_s, steady_s, settle_s, close_after_s }) {
    this.start_s = start_s;
    this.ramp_s = ramp_s;
    this.steady_s = steady_s;
    this.settle_s = settle_s || 0;
    // The same sums in the same order as plan.py, so the bounds are equal floats.
    this.steady_start_s = this.start_s + this.ramp_s + this.settle_s;
    this.end_s = this.steady_start_s + this.steady_s;
    this.steady_start_ms = this.steady_start_s * 1000;
    this.end_ms = this.end_s * 1000;
    // Device streams close this long after the window ends (plan.py says why).
    this.close_ms = (this.end_s + (close_after_s || 0)) * 1000;
  }

  // Whether a fix scheduled at `timeMs` is a sample of the steady state.
  counts(timeMs) {
    return this.steady_start_ms <= timeMs && timeMs < this.end_ms;
  }
}

class DriverResult {
  constructor(index) {
    this.index = index;
    this.ack_ms = []; // fix sent -> ack read
    this.ack_sched_ms = []; // scheduled -> ack read
    this.send_lag_ms = []; // scheduled -> written
    this.counts = {};
    this.errors = {};
    this.error_details = {}; // the first detail of each error
    this.started_s = nowMs() / 1000;
    this.streams_open_max = 0;
    this.generated = []; // per device: [device id, fixes generated, highest acked]
    this.reconnected_s = []; // storm: drop -> SessionStarted
    this.recovered_s = []; // storm: drop -> backlog acked
  }

  count(name, n = 1) {
    this.counts[name] = (this.counts[name] || 0) + n;
  }

  error(name, n = 1, detail = '') {
    this.errors[name] = (this.errors[name] || 0) + n;
    if (!(name in this.error_details)) {
      const at = nowMs() / 1000 - this.started_s;
      this.error_details[name] = `first at ${at.toFixed(1)} s of the run: ${detail}`;
    }
  }

  toJSON() {
    return {
      index: this.index,
      ack_ms: this.ack_ms,
      ack_sched_ms: this.ack_sched_ms,
      send_lag_ms: this.send_lag_ms,
      counts: this.counts,
      errors: this.errors,
      error_details: this.error_details,
      started_s: this.started_s,
      streams_open_max: this.streams_open_max,
      generated: this.generated,
      reconnected_s: this.reconnected_s,
      recovered_s: this.recovered_s,
    };
  }
}

// A small seeded generator (mulberry32): uniform floats in [0, 1).
function seededRandom(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// A normal deviate (Box-Muller) from a uniform generator.
function gauss(random, sigma) {
  const u = 1 - random(); // (0, 1]: the logarithm stays finite
  return sigma * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * random());
}

module.exports = { Window, DriverResult, seededRandom, gauss };
