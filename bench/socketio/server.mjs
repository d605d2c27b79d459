// Socket.IO 4.8 as the benchmark's second system, set up the classic way: a node:cluster
// primary that accepts no WebSocket itself (it hands connections to the workers, as cluster
// does by default on Linux) and publishes a heartbeat to every client once a second through the
// Redis emitter; N workers, each a Socket.IO server with the Redis adapter, websocket transport
// only (so no sticky sessions are needed). Clients emit "join" (acknowledged once joined) and
// "publish" (room, data), which the worker broadcasts to the room with io.to(room).emit.
// Not part of the test suite; bench/compare.py starts it:
//
//   PORT=8800 REDIS_URL=redis://127.0.0.1:6400 WORKERS=2 node socketio/server.mjs
//
// The primary prints one JSON line on stdout once every worker listens:
// {"ready": true, "port": P, "pids": [primary, worker...]}. SIGTERM stops the whole cluster.
import cluster from "node:cluster";
import { createServer } from "node:http";
import { createClient } from "redis";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { Emitter } from "@socket.io/redis-emitter";

const port = Number(process.env.PORT);
const redisUrl = process.env.REDIS_URL;
const workers = Number(process.env.WORKERS || 2);
const HEARTBEAT_INTERVAL_MS = 1000;

if (cluster.isPrimary) {
  let stopping = false;
  const listening = new Set();
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on("listening", (worker) => {
    listening.add(worker.process.pid);
    if (listening.size === workers) {
      const pids = [process.pid, ...listening];
      process.stdout.write(JSON.stringify({ ready: true, port, pids }) + "\n");
    }
  });
  cluster.on("exit", (worker, code, signal) => {
    if (!stopping) {
      process.stderr.write(`socket.io worker ${worker.process.pid} died (${code ?? signal})\n`);
      process.exit(1);
    }
  });
  const redis = createClient({ url: redisUrl });
  await redis.connect();
  const emitter = new Emitter(redis);
  let seq = 0;
  const heartbeat = setInterval(() => {
    seq++;
    emitter.emit("heartbeat", { seq, ts: Date.now() / 1000 });
  }, HEARTBEAT_INTERVAL_MS);
  process.on("SIGTERM", async () => {
    stopping = true;
    clearInterval(heartbeat);
    for (const worker of Object.values(cluster.workers)) worker.kill("SIGTERM");
    await redis.quit();
    process.exit(0);
  });
} else {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const httpServer = createServer();
  const io = new Server(httpServer, {
    transports: ["websocket"],
    adapter: createAdapter(pub, sub),
    serveClient: false,
    perMessageDeflate: false,
  });
  io.on("connection", (socket) => {
    socket.on("join", (room, ack) => {
      if (typeof room !== "string") return;
      socket.join(room);
      if (typeof ack === "function") ack();
    });
    socket.on("publish", (room, data) => {
      if (typeof room === "string") io.to(room).emit("message", data);
    });
  });
  httpServer.listen(port, "127.0.0.1");
  process.on("SIGTERM", () => process.exit(0));
}
