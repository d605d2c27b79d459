// The clients of `history_bench.py kill`: members of trio-fanout's rooms that behave as the
// project's clients do when their worker dies (reconnect after a delay, rejoin with `since`),
// with the `ws` package. Several of these processes share the members; one of them also holds
// the publisher. Not part of the test suite.
//
//   node recover.mjs '{"url": "ws://127.0.0.1:8765/ws", "clients": 1000, "rooms": 20,
//                      "publishes_per_second": 200, "timeout": 30, "backoff_base_ms": 500,
//                      "backoff_cap_ms": 2000, "publisher": true, "connect_concurrency": 100}'
//
// `clients` is this process's share of the members, in `rooms` rooms; the members are half on
// each of two workers (`"split": "even"`, the default) or all on the worker without the
// publisher (`"split": "killed"`: every member is one of the killed worker's clients, and the
// load generator holds no more connections than the clients that recover).
//
// Driven by JSON lines on stdin, each step answered by a JSON line on stdout, so that the
// orchestrator can hold every process at the same step:
//   (with "publisher": true) prints {"event": "publisher", "pid": P}, the publisher's worker;
//   reads {"publisher_pid": P}, opens its members, prints {"event": "members", "victim_pid": V};
//   reads {"publish": true}, (publisher) publishes steadily, 1 s later prints {"event": "ready"};
//   reads {"killed_at_ms": T}, the time worker V was killed, and prints {"event": "recovered"}
//   once each of its members of that worker has reconnected, rejoined with `since` and received
//   the first message it missed (or the timeout passed);
//   reads {"finish": true}, watches 1 s more for gaps, closes, and prints its result: for each
//   of its victims the times of each step of its recovery, in ms since the Unix epoch (the
//   clock every process and the orchestrator share), and its own CPU and event-loop lag.
//
// Unlike loadgen.mjs, which measures steady fan-out and never parses a delivery, these clients
// parse every frame: they must follow each room's epoch and offsets to ask for what they missed.
// A wss:// url is verified against the CA certificate in `ca_file` (PEM), if given.
import WebSocket from "ws";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";

const config = JSON.parse(process.argv[2]);
const SPLIT = config.split ?? "even";
if (!["even", "killed"].includes(SPLIT)) throw new Error(`unknown split: ${SPLIT}`);
// Handshakes in flight at once (in this process; the orchestrator divides its total among the
// processes): enough to connect thousands of clients in seconds without a burst that overflows
// the server's accept backlog.
const CONNECT_CONCURRENCY = config.connect_concurrency ?? 200;
const CLIENT_OPTIONS = { perMessageDeflate: false };
if (config.ca_file) CLIENT_OPTIONS.ca = readFileSync(config.ca_file);

function log(...args) {
  process.stderr.write(`recover: ${args.join(" ")}\n`);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Our event loop's lag, sampled every 10 ms: how late a timer or a socket's event ran.
const lag = monitorEventLoopDelay({ resolution: 10 });
lag.enable();

function lagFigures() {
  return {
    loadgen_lag_p99_ms: lag.percentile(99) / 1e6,
    loadgen_lag_max_ms: lag.max / 1e6,
  };
}

// The time since the Unix epoch in ms, on the clock the orchestrator reads its kill time from.
function wallMs() {
  return performance.timeOrigin + performance.now();
}

// The orchestrator's commands, one JSON object a line. Its end (the orchestrator gone) ends us.
const commands = [];
const waiting = [];
let finished = false;
const input = createInterface({ input: process.stdin });
input.on("line", (line) => {
  const command = JSON.parse(line);
  const resolve = waiting.shift();
  if (resolve) resolve(command);
  else commands.push(command);
});
input.on("close", () => {
  if (!finished) {
    log("stdin closed before the end");
    process.exit(1);
  }
});

// The next command, which must carry `key`.
async function expect(key) {
  const command = commands.length
    ? commands.shift() : await new Promise((resolve) => waiting.push(resolve));
  if (!(key in command)) throw new Error(`expected ${key}, got ${JSON.stringify(command)}`);
  return command;
}

function emit(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

let stopping = false;

// One member of a room, as the project's clients behave: it keeps its room's epoch and last
// offset, and when its connection ends it reconnects after a delay and rejoins with `since`.
// `lost` records the first loss and the recovery from it, in wallMs().
class Member {
  constructor() {
    this.room = null;
    this.epoch = null;
    this.offset = null;
    this.pid = null;
    this.attempts = 0;
    this.gaps = 0;
    this.duplicates = 0;
    this.lost = null;
    this.victim = false;
    this.discarded = false;
    this.onJoined = () => {};
  }

  // Connect; resolve once welcomed. A member with a room rejoins it at once.
  open() {
    return new Promise((resolve, reject) => {
      if (this.lost) this.lost.attempted = wallMs();
      const ws = new WebSocket(config.url, CLIENT_OPTIONS);
      let welcomed = false;
      ws.on("open", () => {
        if (this.lost) this.lost.opened = wallMs();
      });
      ws.on("error", (error) => {
        if (!welcomed) reject(error);
      });
      ws.on("close", () => {
        if (!welcomed) reject(new Error("closed before the welcome"));
        else this.connectionEnded();
      });
      ws.on("message", (data) => {
        const frame = JSON.parse(data.toString());
        if (frame.type === "welcome") {
          welcomed = true;
          this.ws = ws;
          this.pid = frame.pid;
          if (this.lost) this.lost.welcomed = wallMs();
          if (this.room !== null) this.join();
          resolve();
        } else {
          this.onFrame(frame);
        }
      });
    });
  }

  join() {
    const join = { type: "join", room: this.room, id: 1 };
    if (this.epoch !== null) join.since = { epoch: this.epoch, offset: this.offset };
    this.ws.send(JSON.stringify(join));
  }

  onFrame(frame) {
    if (frame.type === "joined") {
      const lost = this.lost;
      if (lost && lost.joined === undefined) {
        lost.joined = wallMs();
        lost.recovered = frame.recovered === true;
        lost.missed = frame.offset - this.offset;
        if (!lost.recovered) this.offset = frame.offset; // nothing older is coming
        if (lost.missed <= 0 || !lost.recovered) lost.firstMissed = lost.joined;
      } else if (this.offset === null) {
        this.offset = frame.offset;
      }
      this.epoch = frame.epoch;
      this.onJoined();
    } else if (frame.type === "message" && frame.room === this.room) {
      if (frame.offset === this.offset + 1) {
        if (this.lost && this.lost.firstMissed === undefined) this.lost.firstMissed = wallMs();
      } else if (frame.offset <= this.offset) {
        this.duplicates++;
        return;
      } else {
        this.gaps++;
      }
      this.offset = frame.offset;
    } else if (frame.type === "error") {
      log(`member on room ${this.room}: ${JSON.stringify(frame)}`);
    }
  }

  connectionEnded() {
    if (stopping || this.discarded) return;
    if (this.lost === null) this.lost = { closed: wallMs() };
    this.retry();
  }

  // The first attempt after a loss waits a uniform random time up to backoff_base_ms (0:
  // none); a failed attempt retries after a growing delay with full jitter.
  retry() {
    const { backoff_base_ms: base, backoff_cap_ms: cap } = config;
    const delay = this.attempts === 0
      ? Math.random() * base
      : Math.random() * Math.min(cap, Math.max(base, 10) * 2 ** this.attempts);
    this.attempts++;
    setTimeout(() => {
      if (!stopping) this.open().catch(() => this.retry());
    }, delay);
  }
}

function openPublisher() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(config.url, CLIENT_OPTIONS);
    ws.on("error", reject);
    ws.on("message", (data) => {
      const frame = JSON.parse(data.toString());
      if (frame.type === "welcome") resolve({ ws, pid: frame.pid });
      else if (frame.type === "error") log(`publisher: ${data}`);
    });
    ws.on("close", () => {
      if (!stopping) log("the publisher's connection ended");
    });
  });
}

// Members in `rooms` rooms, as many of each room on each worker that has members: half on each
// worker (SPLIT "even"), or all on the worker other than the publisher's (SPLIT "killed"). The
// kernel gives each new connection to one worker's listening socket by a hash of its addresses,
// so a connection landing on a worker that has its share, or on the publisher's with "killed",
// is closed and another opened; with "killed", about one in two connections is kept.
async function openMembers(count, rooms, publisherPid) {
  const members = [];
  const perPid = new Map();
  const wanted = (pid) => {
    const have = perPid.get(pid) ?? 0;
    if (SPLIT === "killed") {
      return pid !== publisherPid && (perPid.size === 0 || perPid.has(pid)) && have < count;
    }
    return have < count / 2 && (perPid.size < 2 || perPid.has(pid));
  };
  let opened = 0;
  while (members.length < count) {
    if (opened > count * 20) throw new Error(`unbalanced: ${JSON.stringify([...perPid])}`);
    const batch = Array.from({ length: Math.min(CONNECT_CONCURRENCY, count - members.length) },
      () => new Member());
    opened += batch.length;
    await Promise.all(batch.map((member) => member.open()));
    const joins = [];
    for (const member of batch) {
      if (!wanted(member.pid)) {
        member.discarded = true;
        member.ws.terminate();
        continue;
      }
      const have = perPid.get(member.pid) ?? 0;
      perPid.set(member.pid, have + 1);
      member.room = `room-${have % rooms}`;
      joins.push(new Promise((resolve) => { member.onJoined = resolve; }));
      member.join();
      members.push(member);
    }
    await Promise.all(joins);
    for (const member of members) member.onJoined = () => {};
  }
  return { members, perPid, opened };
}

// What the orchestrator needs to merge our victims' timings with the other processes': each
// step of each one's recovery, in wallMs() (absent where it never happened).
function victimRecord(member) {
  const { lost } = member;
  const record = { pid: member.pid, attempts: member.attempts };
  if (lost === null) return record;
  for (const key of ["closed", "attempted", "opened", "welcomed", "joined", "firstMissed",
    "recovered", "missed"]) {
    if (lost[key] !== undefined) record[key] = lost[key];
  }
  return record;
}

async function recover() {
  const { clients: count, rooms, publishes_per_second: rate, timeout } = config;
  const publisher = config.publisher ? await openPublisher() : null;
  if (publisher) emit({ event: "publisher", pid: publisher.pid });
  const { publisher_pid: publisherPid } = await expect("publisher_pid");
  const { members, perPid, opened } = await openMembers(count, rooms, publisherPid);
  const victimPid = [...perPid.keys()].find((pid) => pid !== publisherPid);
  if (perPid.size !== (SPLIT === "even" ? 2 : 1) || victimPid === undefined) {
    throw new Error(`expected members on ${SPLIT === "even" ? "two workers, one" : "a worker"}`
      + ` other than the publisher's (${publisherPid}): ${JSON.stringify([...perPid])}`);
  }
  const victims = members.filter((member) => member.pid === victimPid);
  for (const member of victims) member.victim = true;
  log(`${count} members ready (${JSON.stringify([...perPid])}, ${opened} connections opened)`
    + (publisher ? `; publisher on ${publisher.pid}` : ""));
  emit({ event: "members", victim_pid: victimPid, opened });

  // A steady publisher: `rate` publishes a second over all rooms, in room order.
  await expect("publish");
  let sent = 0;
  const publishStart = performance.now();
  const publishing = publisher && (async () => {
    while (!stopping) {
      const due = Math.floor(((performance.now() - publishStart) / 1000) * rate);
      for (; sent < due; sent++) {
        publisher.ws.send(`{"type":"publish","room":"room-${sent % rooms}","data":${sent}}`);
      }
      await sleep(5);
    }
  })();
  await sleep(1000); // every room has numbered messages, every member a position

  emit({ event: "ready" });
  const cpuStart = process.cpuUsage();
  const readyAt = wallMs();
  lag.reset();
  const { killed_at_ms: killedAt } = await expect("killed_at_ms");
  const done = () => victims.every((m) => m.lost && m.lost.firstMissed !== undefined);
  while (!done() && wallMs() - killedAt < timeout * 1000) await sleep(5);
  const recoveredAt = wallMs();
  emit({ event: "recovered" });
  const cpu = process.cpuUsage(cpuStart);
  const lagDuring = lagFigures();
  await expect("finish");
  await sleep(1000); // and then: does every member keep receiving in order?
  stopping = true;
  await publishing;
  await sleep(500);
  for (const member of members) member.ws.terminate();
  if (publisher) publisher.ws.terminate();
  finished = true;
  return {
    clients: count,
    setup_connections: opened,
    victim_pid: victimPid,
    victims: victims.map(victimRecord),
    others_disconnected: members.filter((m) => !m.victim && m.lost).length,
    gaps: members.reduce((sum, m) => sum + m.gaps, 0),
    duplicates: members.reduce((sum, m) => sum + m.duplicates, 0),
    publishes: sent,
    recovered_at_ms: recoveredAt,
    loadgen_cpu_percent: ((cpu.user + cpu.system) / 1e3 / (recoveredAt - readyAt)) * 100,
    ...lagDuring,
  };
}

try {
  // The result is hundreds of kB: exit once the pipe has taken all of it.
  process.stdout.write(JSON.stringify(await recover()) + "\n", () => process.exit(0));
} catch (error) {
  log(error.stack || error);
  process.exit(1);
}
