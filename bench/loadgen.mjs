// The load generator of fanout_bench.py: many WebSocket clients of trio-fanout in one Node.js
// process (the `ws` package), so that its limits are not Python's and its CPU is reported apart.
//
//   node loadgen.mjs '{"mode": "rate", "url": "ws://127.0.0.1:8765/ws", ...}'
//
// Modes (the result is one JSON line on stdout; progress goes to stderr):
//   rate:      `clients` members spread over `rooms` rooms, one extra publisher per room; publish
//              for `duration` s so that members receive `deliveries` messages a second in all;
//              report latency percentiles, lost, duplicated and reordered messages, and our CPU.
//   broadcast: `clients` members of one room; publish `messages` messages one at a time and
//              report, for each, the time until the last member received it.
//   idle:      open `clients` connections, print {"ready": true}, hold them until stdin closes.
// Lines {"event": "start"} and {"event": "end"} on stdout bracket the measured part of a run.
// A wss:// url is verified against the CA certificate in `ca_file` (PEM), if given.
import WebSocket from "ws";
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";

const config = JSON.parse(process.argv[2]);
const CONNECT_CONCURRENCY = 200;
const CLIENT_OPTIONS = { perMessageDeflate: false };
if (config.ca_file) CLIENT_OPTIONS.ca = readFileSync(config.ca_file);

function log(...args) {
  process.stderr.write(`loadgen: ${args.join(" ")}\n`);
}

// Tell the orchestrator when the measured part begins and ends (it reads the server's CPU then).
function mark(event) {
  process.stdout.write(JSON.stringify({ event }) + "\n");
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Open one client; resolve once it is welcomed (and has joined `room`, if given).
function openClient(url, room, onFrame) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, CLIENT_OPTIONS);
    ws.on("error", reject);
    ws.on("message", (data) => {
      const text = data.toString();
      if (ws.ready) {
        onFrame(ws, text);
        return;
      }
      const frame = JSON.parse(text);
      if (frame.type === "welcome") {
        if (room === null) {
          ws.ready = true;
          resolve(ws);
        } else {
          ws.send(JSON.stringify({ type: "join", room, id: 1 }));
        }
      } else if (frame.type === "joined") {
        ws.ready = true;
        resolve(ws);
      } else if (frame.type === "error") {
        reject(new Error(text));
      }
    });
  });
}

async function openMany(count, roomOf, onFrame) {
  const clients = new Array(count);
  let next = 0;
  async function worker() {
    while (next < count) {
      const index = next++;
      clients[index] = await openClient(config.url, roomOf(index), onFrame);
    }
  }
  await Promise.all(Array.from({ length: Math.min(CONNECT_CONCURRENCY, count) }, worker));
  return clients;
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function rate() {
  const { clients: count, rooms, deliveries, duration } = config;
  const membersPerRoom = count / rooms;
  const publishesPerSecond = deliveries / membersPerRoom;
  const publishers = rooms;
  // Per member: the last seq seen from each publisher (publisher p publishes only to room p).
  const lastSeq = new Int32Array(count).fill(0);
  const latencies = [];
  let received = 0, duplicated = 0, reordered = 0;
  let recording = false;
  let memberIndex = 0;
  const onFrame = (ws, text) => {
    if (!recording) return;
    const frame = JSON.parse(text);
    if (frame.type !== "message") return;
    const { t, s } = frame.data;
    const last = lastSeq[ws.index];
    if (s === last + 1) {
      received++;
    } else if (s <= last) {
      duplicated++;
      return;
    } else {
      reordered++;
      received++;
    }
    lastSeq[ws.index] = s;
    latencies.push(performance.now() - t);
  };
  const members = await openMany(count, (i) => `room-${i % rooms}`, onFrame);
  members.forEach((ws, i) => { ws.index = i; memberIndex++; });
  const pubs = await openMany(publishers, () => null, () => {});
  log(`${count} members and ${publishers} publishers ready`);

  recording = true;
  mark("start");
  const seq = new Int32Array(publishers).fill(0);
  const cpuStart = process.cpuUsage();
  const start = performance.now();
  let sent = 0;
  while (performance.now() - start < duration * 1000) {
    const due = Math.floor(((performance.now() - start) / 1000) * publishesPerSecond);
    while (sent < due) {
      const p = sent % publishers;
      seq[p]++;
      const data = { t: performance.now(), p, s: seq[p] };
      pubs[p].send(`{"type":"publish","room":"room-${p}","data":${JSON.stringify(data)}}`);
      sent++;
    }
    await sleep(2);
  }
  const publishEnd = performance.now();
  const expected = sent * membersPerRoom;
  // Let what is on its way arrive (bounded).
  while (received < expected && performance.now() - publishEnd < 3000) await sleep(10);
  mark("end");
  const cpu = process.cpuUsage(cpuStart);
  const elapsed = (performance.now() - start) / 1000;
  latencies.sort((a, b) => a - b);
  for (const ws of [...members, ...pubs]) ws.terminate();
  return {
    mode: "rate",
    clients: count,
    rooms,
    target_deliveries_per_second: deliveries,
    publishes: sent,
    expected,
    received,
    lost: expected - received,
    duplicated,
    reordered,
    achieved_deliveries_per_second: received / (publishEnd - start) * 1000,
    p50_ms: percentile(latencies, 50),
    p99_ms: percentile(latencies, 99),
    max_ms: latencies.length ? latencies[latencies.length - 1] : null,
    loadgen_cpu_percent: ((cpu.user + cpu.system) / 1e6 / elapsed) * 100,
  };
}

async function broadcast() {
  const { clients: count, messages } = config;
  let pending = 0, lastArrival = 0;
  const onFrame = (ws, text) => {
    if (text.includes('"type":"message"')) {
      pending--;
      if (pending === 0) lastArrival = performance.now();
    }
  };
  const members = await openMany(count, () => "everyone", onFrame);
  const [publisher] = await openMany(1, () => null, () => {});
  log(`${count} members ready`);
  const toLast = [];
  mark("start");
  for (let i = 0; i < messages; i++) {
    pending = count;
    const sentAt = performance.now();
    publisher.send(`{"type":"publish","room":"everyone","data":${i}}`);
    const deadline = sentAt + 5000;
    while (pending > 0 && performance.now() < deadline) await sleep(1);
    toLast.push(pending === 0 ? lastArrival - sentAt : null);
    await sleep(100);
  }
  mark("end");
  for (const ws of [...members, publisher]) ws.terminate();
  const complete = toLast.filter((v) => v !== null).sort((a, b) => a - b);
  return {
    mode: "broadcast", clients: count, messages, incomplete: messages - complete.length,
    received: count * complete.length,
    to_last_ms: toLast, median_to_last_ms: percentile(complete, 50),
  };
}

async function idle() {
  const clients = await openMany(config.clients, () => null, () => {});
  process.stdout.write(JSON.stringify({ mode: "idle", ready: true, clients: clients.length }) + "\n");
  process.stdin.resume();
  await new Promise((resolve) => process.stdin.on("end", resolve));
  for (const ws of clients) ws.terminate();
  return null;
}

const modes = { rate, broadcast, idle };
const result = await modes[config.mode]();
if (result) process.stdout.write(JSON.stringify(result) + "\n");
process.exit(0);
