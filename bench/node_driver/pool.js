'use strict';
// The Track service from protos/ (loaded at run time) and a pool of channels,
// each carrying a bounded number of streams on a TCP connection of its own.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');

const CHANNEL_OPTIONS = {
  // Separate connections per channel, not one subchannel shared by the process.
  'grpc.use_local_subchannel_pool': 1,
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
};

function loadTrackSession() {
  const definition = protoLoader.loadSync('tracking/v1/track.proto', {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: Number, // sequence numbers and epoch milliseconds fit in a double
    enums: Number,
    defaults: false,
    oneofs: true, // `message` names the field set in a oneof
  });
  return grpc.loadPackageDefinition(definition).tracking.v1.TrackSession;
}

class ChannelPool {
  constructor(target, streamsPerChannel, token) {
    this.TrackSession = loadTrackSession();
    this.target = target;
    this.streamsPerChannel = Math.max(1, streamsPerChannel);
    this.token = token || '';
    this.clients = new Map();
  }

  // Slot i uses channel floor(i / streamsPerChannel).
  client(slot) {
    const number = Math.floor(slot / this.streamsPerChannel);
    let client = this.clients.get(number);
    if (client === undefined) {
      const credentials = grpc.credentials.createInsecure();
      client = new this.TrackSession(this.target, credentials, CHANNEL_OPTIONS);
      this.clients.set(number, client);
    }
    return client;
  }

  // Metadata of a new call: the bearer token when the plan has one.
  metadata() {
    const metadata = new grpc.Metadata();
    if (this.token) {
      metadata.set('authorization', `Bearer ${this.token}`);
    }
    return metadata;
  }

  // Close every channel; the next client(slot) opens a new one.
  close() {
    for (const client of this.clients.values()) {
      client.close();
    }
    this.clients.clear();
  }
}

// The name of a status code, as grpc.StatusCode names it in Python.
function statusName(code) {
  return grpc.status[code] || `CODE_${code}`;
}

module.exports = { ChannelPool, statusName };
