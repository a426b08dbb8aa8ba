'use strict';
// A simulated device: one Track stream, fixes on an open-loop schedule, resume.
//
// The same behaviour as tracking_grpc/loadgen/device.py. The device produces a fix
// every interval on a fixed grid of whole milliseconds, connected or not, and keeps
// each fix until an ack covers it. The fix time is the scheduled time, so a watcher
// can tell how old an update is. On a drop it reconnects with resume_from_seq,
// discards what the server says it holds, and sends the rest in one batch.

const { nowMs, sleep, sleepUntil } = require('./clock');
const { gauss } = require('./result');
const { statusName } = require('./pool');

const RETRIES = 5;
const PROVIDER_GNSS = 1;
const DRAIN_WAIT_MS = 10000; // after the window: the last acks
const CLOSE_WAIT_MS = 5000; // after half-closing: the server's end of the stream
const END_WAIT_MS = 1000; // a status without the end of the read side

// One call: its writes, and whether it is over.
class Session {
  constructor(call) {
    this.call = call;
    this.writing = false; // one writer at a time
    this.closed = false;
    this.pendingWrite = null;
  }

  // Resolves true once the message is handed to the transport, false if the call
  // ended first.
  write(message) {
    if (this.closed) {
      return Promise.resolve(false);
    }
    return new Promise((resolve) => {
      this.pendingWrite = resolve;
      this.call.write(message, (error) => {
        this.pendingWrite = null;
        resolve(!error);
      });
    });
  }

  close() {
    this.closed = true;
    if (this.pendingWrite !== null) {
      this.pendingWrite(false);
      this.pendingWrite = null;
    }
  }
}

class Device {
  constructor({ deviceId, slot, plan, window, result, random, openAtS }) {
    this.deviceId = deviceId;
    this.slot = slot;
    this.plan = plan;
    this.window = window;
    this.result = result;
    this.random = random;
    this.openAtS = openAtS;
    this.intervalMs = Math.round(plan.device_interval_s * 1000);
    const phaseMs = Math.floor(random() * Math.max(1, this.intervalMs));
    this.nextMs = Math.round(openAtS * 1000) + phaseMs;
    const spread = plan.spread_deg;
    this.lat = plan.center[0] + (2 * random() - 1) * spread;
    this.lon = plan.center[1] + (2 * random() - 1) * spread;
    this.seq = 0;
    this.ackedSeq = 0;
    this.unacked = []; // {fix, schedMs, sentMs, sends}, in sequence order
    this.writtenSeq = 0;
    this.call = null; // the current call, opening or open
    this.session = null; // the current call once SessionStarted arrived
    this.dropped = false; // set by the storm: the drop is expected
    this.reconnectAtS = 0;
    this.recoverSeq = 0; // after a reconnect: acked past this means recovered
    this.generating = true;
    this.stopped = false;
    this.recorded = false; // the generated count is in the result
    this.onDrained = null; // set while run() waits for the last acks
    this.stopping = new Promise((resolve) => {
      this.wakeOnStop = resolve;
    });
  }

  get connected() {
    return this.session !== null;
  }

  async run(pool) {
    await sleepUntil(this.openAtS * 1000);
    let connectionDone = false;
    const connection = this._connectLoop(pool).finally(() => {
      connectionDone = true;
    });
    try {
      await this._generate();
      if (this.unacked.length && !connectionDone) {
        const drained = new Promise((resolve) => {
          this.onDrained = resolve;
        });
        await Promise.race([drained, connection, sleep(DRAIN_WAIT_MS)]);
        this.onDrained = null;
      }
    } finally {
      this.generating = false;
      const session = this.session;
      if (session !== null && !connectionDone) {
        session.call.end();
        await Promise.race([connection, sleep(CLOSE_WAIT_MS)]);
      }
      this._record();
      this.stop();
      await connection;
    }
  }

  // The storm: cut the stream (opening or open) and reconnect at `reconnectAtS`.
  cut(reconnectAtS) {
    this.reconnectAtS = reconnectAtS;
    this.dropped = true;
    if (this.call !== null) {
      this.call.cancel();
    }
  }

  // End everything now (the run is over): no reconnect, no further fix.
  stop() {
    this.stopped = true;
    this.wakeOnStop();
    if (this.call !== null) {
      this.call.cancel();
    }
  }

  // Past the grace period: what was generated and acked so far, then stop.
  abort() {
    this._record();
    this.stop();
  }

  _record() {
    if (!this.recorded) {
      this.recorded = true;
      this.result.generated.push([this.deviceId, this.seq, this.ackedSeq]);
    }
  }

  async _generate() {
    const endMs = this.window.end_s * 1000;
    while (this.nextMs < endMs) {
      await sleepUntil(this.nextMs);
      if (this.stopped) {
        return;
      }
      this.seq += 1;
      this.lat += gauss(this.random, 1e-4);
      this.lon += gauss(this.random, 1e-4);
      const fix = {
        seq: this.seq,
        time_ms: this.nextMs,
        lat: this.lat,
        lon: this.lon,
        accuracy_m: 5.0,
        provider: PROVIDER_GNSS,
      };
      this.unacked.push({ fix, schedMs: this.nextMs, sentMs: 0, sends: 0 });
      this.result.count('fixes_generated');
      // As in device.py, the next fix waits for this write: a stalled stream delays
      // the generation of the next fix, never batches several in one message.
      await this._flush();
      this.nextMs += this.intervalMs;
    }
    // Streams stay open past the window's end, as in device.py: thousands closing
    // in its last interval, or at its end, would load the server while it still
    // acks fixes of the steady state it measures.
    await Promise.race([sleepUntil(this.window.close_ms), this.stopping]);
  }

  // Write every fix not yet written on this stream; one writer at a time. Never
  // rejects: a broken stream is seen by the read side, which reconnects.
  async _flush() {
    const session = this.session;
    if (session === null || session.writing) {
      return;
    }
    session.writing = true;
    try {
      while (!session.closed && session === this.session) {
        const batch = this.unacked.filter((p) => p.fix.seq > this.writtenSeq);
        if (batch.length === 0) {
          return;
        }
        const now = nowMs();
        for (const pending of batch) {
          if (pending.sends === 0) {
            pending.sentMs = now;
            if (this.window.counts(pending.schedMs)) {
              this.result.send_lag_ms.push(now - pending.schedMs);
            }
          }
          pending.sends += 1;
        }
        this.writtenSeq = batch[batch.length - 1].fix.seq;
        const fixes = batch.map((p) => p.fix);
        const writing = nowMs();
        if (!(await session.write({ batch: { fixes } }))) {
          return;
        }
        // A write that waits long with the loop on time waits for the transport
        // (HTTP/2 flow control, the connection), not for this process.
        const waited = nowMs() - writing;
        if (this.window.counts(writing) && waited > 100) {
          this.result.count('driver_writes_waiting_over_100ms');
          if (waited > 1000) {
            this.result.count('driver_writes_waiting_over_1s');
          }
        }
        this.result.count('messages_sent');
        this.result.count('fixes_sent', batch.length);
      }
    } finally {
      session.writing = false;
    }
  }

  _onAck(ack) {
    const now = nowMs();
    const result = this.result;
    const rejections = ack.rejections || [];
    const rejected = Number(ack.rejected || 0) || rejections.length; // all, not only listed
    if (rejected) {
      result.error('rejected_fixes', rejected);
    }
    const ackedSeq = ack.acked_seq || 0;
    let top = ackedSeq;
    for (const rejection of rejections) {
      top = Math.max(top, rejection.seq || 0);
    }
    this.ackedSeq = Math.max(this.ackedSeq, ackedSeq);
    result.count('fixes_stored', ack.stored || 0);
    result.count('fixes_duplicate', ack.duplicates || 0);
    while (this.unacked.length && this.unacked[0].fix.seq <= top) {
      const pending = this.unacked.shift();
      if (pending.sends === 1 && this.window.counts(pending.schedMs)) {
        result.ack_ms.push(now - pending.sentMs);
        result.ack_sched_ms.push(now - pending.schedMs);
      }
    }
    if (!this.unacked.length && this.onDrained !== null) {
      this.onDrained();
    }
    if (this.recoverSeq && this.ackedSeq >= this.recoverSeq) {
      result.recovered_s.push(now / 1000 - this.plan.storm.drop_s);
      this.recoverSeq = 0;
    }
  }

  _onStarted(session, started) {
    const stored = started.last_stored_seq || 0;
    const result = this.result;
    if (stored > this.seq) {
      // Fixes of another run: ours would be taken for resends.
      result.error(
        'device_id_in_use',
        1,
        `the server holds ${this.deviceId} up to seq ${stored}, beyond this run's: ` +
          'a run tag of an earlier run? (bench/load.py --run-tag)',
      );
    }
    if (this.recoverSeq) {
      result.reconnected_s.push(nowMs() / 1000 - this.plan.storm.drop_s);
      result.count('streams_resumed');
    }
    this.ackedSeq = Math.max(this.ackedSeq, stored);
    while (this.unacked.length && this.unacked[0].fix.seq <= stored) {
      this.unacked.shift();
      result.count('fixes_acked_by_resume');
    }
    this.writtenSeq = stored;
    this.session = session;
    result.count('streams_opened');
    this._flush().catch((error) => {
      result.error(`driver_${error.name}`, 1, error.message);
    });
    if (this.recoverSeq && !this.unacked.length) {
      result.recovered_s.push(nowMs() / 1000 - this.plan.storm.drop_s);
      this.recoverSeq = 0;
    }
  }

  // Never rejects (run() would not see it until the last fix): a failure of the
  // client itself is counted as driver_<name>, like a failed task in driver.py.
  async _connectLoop(pool) {
    try {
      await this._connectUntilDone(pool);
    } catch (error) {
      this.result.error(`driver_${error.name}`, 1, error.message);
    }
  }

  async _connectUntilDone(pool) {
    let failures = 0; // in a row: a stream that got an ack starts the count again
    while (!this.stopped) {
      const ackedBefore = this.ackedSeq;
      const [outcome, detail] = await this._track(pool);
      this.call = null;
      this.session = null;
      if (this.stopped) {
        return;
      }
      if (this.dropped) {
        this.dropped = false;
        this.result.count('streams_dropped');
        await Promise.race([sleepUntil(this.reconnectAtS * 1000), this.stopping]);
        this.recoverSeq = Math.max(this.seq, 1);
        continue;
      }
      if (!this.generating) {
        return; // the server closed the stream after our half-close
      }
      this.result.error(`track_${outcome}`, 1, detail);
      failures = this.ackedSeq > ackedBefore ? 1 : failures + 1;
      if (failures > RETRIES) {
        return;
      }
      await Promise.race([sleep(500 * failures), this.stopping]);
    }
  }

  // One call from hello to its status; resolves [outcome, detail], never rejects.
  _track(pool) {
    return new Promise((resolve) => {
      const call = pool.client(this.slot).Track(pool.metadata());
      const session = new Session(call);
      let started = false;
      let noSession = false;
      let status = null;
      let readEnded = false;
      const finish = () => {
        if (session.closed) {
          return;
        }
        session.close();
        if (noSession || (status.code === 0 && !started)) {
          resolve(['NO_SESSION', '']);
        } else if (status.code === 0) {
          resolve(['closed', '']);
        } else {
          resolve([statusName(status.code), status.details || '']);
        }
      };
      call.on('data', (response) => {
        if (session.closed || noSession) {
          return;
        }
        if (!started) {
          if (response.message !== 'started') {
            noSession = true; // anything but SessionStarted answers the hello
            call.cancel();
            return;
          }
          started = true;
          this._onStarted(session, response.started);
        } else if (response.message === 'ack') {
          this._onAck(response.ack);
        } else if (response.message === 'event') {
          this.result.count('events');
        }
      });
      call.on('error', () => {}); // the status event tells what happened
      // Acks read before the status are handled first: wait for the read side's end.
      call.on('end', () => {
        readEnded = true;
        if (status !== null) {
          finish();
        }
      });
      call.on('status', (received) => {
        status = received;
        if (readEnded) {
          finish();
        } else {
          setTimeout(finish, END_WAIT_MS);
        }
      });
      this.call = call;
      const hello = { device_id: this.deviceId, want_events: this.plan.want_events };
      if (this.seq) {
        hello.resume_from_seq = this.ackedSeq + 1;
      }
      call.write({ hello });
    });
  }
}

module.exports = { Device };
