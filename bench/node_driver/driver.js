'use strict';
// The device streams of one bench/load.py driver process, in Node.js.
//
//   node bench/node_driver/driver.js RESULT.json < PLAN.json
//
// Reads the driver's Plan (tracking_grpc/loadgen/plan.py) as JSON on standard input,
// runs its devices like tracking_grpc/loadgen/driver.py does (same device ids, same
// schedule, storm and grace period), and writes a DriverResult-shaped JSON to
// RESULT.json. Gateways and watchers stay in Python driver processes.

const fs = require('node:fs');
const { nowMs, sleep, sleepUntil } = require('./clock');
const { Device } = require('./device');
const { ChannelPool } = require('./pool');
const { DriverResult, Window, seededRandom } = require('./result');

const END_GRACE_S = 30.0; // after the window: last acks, then everything is stopped
const COUNT_EVERY_MS = 500;
const LOOP_TICK_MS = 50;

// The same ids as device_id() in driver.py, so verify finds the stored rows.
function deviceId(plan, i) {
  const run = plan.run ? `${plan.run}-` : '';
  const index = String(plan.index).padStart(2, '0');
  return `load-${run}${index}-${String(i).padStart(6, '0')}`;
}

function readStdin() {
  return fs.readFileSync(0, 'utf8');
}

async function storm(plan, devices, pool) {
  const { drop_s: dropS, spread_s: spreadS } = plan.storm;
  await sleepUntil(dropS * 1000);
  const random = seededRandom(plan.index * 7919 + 1);
  for (const device of devices) {
    device.cut(dropS + random() * spreadS); // connected or opening: every call is cut
  }
  pool.close();
}

// Counts, in the window, the times this process's event loop ran late: a late loop
// delays every write and ack read of its streams, which the load tool would
// otherwise take for the server's doing.
function watchLoop(window, result) {
  let expected = nowMs() + LOOP_TICK_MS;
  return setInterval(() => {
    const now = nowMs();
    const late = now - expected;
    expected = now + LOOP_TICK_MS;
    if (!window.counts(now)) {
      return;
    }
    if (late > 100) {
      result.count('driver_loop_late_over_100ms');
    }
    if (late > 1000) {
      result.count('driver_loop_late_over_1s');
    }
  }, LOOP_TICK_MS);
}

function countStreams(devices, result) {
  let open = 0;
  for (const device of devices) {
    open += device.connected ? 1 : 0;
  }
  result.streams_open_max = Math.max(result.streams_open_max, open);
}

async function drive(plan) {
  if (plan.gateways || plan.watchers) {
    throw new Error('the node driver runs device streams only (no gateways, watchers)');
  }
  const result = new DriverResult(plan.index);
  const window = new Window(plan.window);
  const { target, streams_per_channel: perChannel, tenant_token: token } = plan;
  const pool = new ChannelPool(target, perChannel, token);
  const seeds = seededRandom(plan.index);
  const devices = [];
  for (let i = 0; i < plan.devices; i++) {
    devices.push(
      new Device({
        deviceId: deviceId(plan, i),
        slot: i,
        plan,
        window,
        result,
        random: seededRandom(Math.floor(seeds() * 2 ** 32)),
        openAtS: window.start_s + (window.ramp_s * i) / Math.max(1, plan.devices),
      }),
    );
  }
  const counter = setInterval(() => countStreams(devices, result), COUNT_EVERY_MS);
  const loopWatch = watchLoop(window, result);
  if (plan.storm) {
    storm(plan, devices, pool).catch((error) => {
      console.error('storm failed:', error);
      result.error(`driver_${error.name || 'Error'}`);
    });
  }
  const finished = new Set();
  const running = devices.map((device) =>
    device.run(pool).then(
      () => finished.add(device),
      (error) => {
        finished.add(device);
        console.error(`device ${device.deviceId} failed:`, error);
        result.error(`driver_${error.name || 'Error'}`);
      },
    ),
  );
  const timeoutMs = (window.end_s + END_GRACE_S) * 1000 - nowMs();
  await Promise.race([Promise.all(running), sleep(Math.max(1000, timeoutMs))]);
  for (const device of devices) {
    if (!finished.has(device)) {
      result.error('driver_timeout');
      device.abort();
    }
  }
  clearInterval(counter);
  clearInterval(loopWatch);
  pool.close();
  return result;
}

async function main() {
  const resultPath = process.argv[2];
  if (!resultPath) {
    console.error('usage: node driver.js RESULT.json < PLAN.json');
    process.exit(2);
  }
  const plan = JSON.parse(readStdin());
  const result = await drive(plan);
  fs.writeFileSync(resultPath, JSON.stringify(result));
  process.exit(0);
}

main().catch((error) => {
  console.error('node driver failed:', error);
  process.exit(1);
});
