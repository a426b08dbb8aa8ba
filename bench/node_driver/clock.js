'use strict';
// Wall-clock time in milliseconds with sub-millisecond resolution, and sleeps.
//
// Times are Unix epoch milliseconds, like time.time() * 1000 in the Python driver,
// so send, ack and watcher times line up with the server's clock and the watcher's.

const { performance } = require('node:perf_hooks');

const ORIGIN_MS = performance.timeOrigin;

function nowMs() {
  return ORIGIN_MS + performance.now();
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));
}

// Resolves once the wall clock reads at least `wallMs` (a timer may fire early
// against the wall clock: libuv measures from the start of its loop iteration).
async function sleepUntil(wallMs) {
  let delay;
  while ((delay = wallMs - nowMs()) > 0) {
    await sleep(Math.ceil(delay));
  }
}

module.exports = { nowMs, sleep, sleepUntil };
