// Checks a running bench/socketio/server.mjs with the official client (socket.io-client,
// websocket transport): join a room, receive a publish to it, receive the heartbeat. The load
// generator speaks the same protocol with raw frames (cheaper per delivery); this check is what
// shows that the server it measures answers the real client as expected. Exits 0 when all three
// happen within 10 s, 1 otherwise.
//
//   node socketio/check.mjs ws://127.0.0.1:PORT
import { io } from "socket.io-client";

const TIMEOUT_MS = 10_000;
const socket = io(process.argv[2], { transports: ["websocket"], reconnection: false });
const timer = setTimeout(() => fail("timed out"), TIMEOUT_MS);
const seen = { message: false, heartbeat: false };

function fail(reason) {
  process.stderr.write(`socket.io check failed: ${reason}\n`);
  process.exit(1);
}

function done(what) {
  seen[what] = true;
  if (seen.message && seen.heartbeat) {
    clearTimeout(timer);
    socket.close();
    process.exit(0);
  }
}

socket.on("connect_error", (error) => fail(error.message));
socket.on("heartbeat", (beat) => {
  if (Number.isInteger(beat?.seq)) done("heartbeat");
});
socket.on("message", (data) => {
  if (data === "check") done("message");
  else fail(`unexpected message ${JSON.stringify(data)}`);
});
socket.on("connect", async () => {
  await socket.timeout(TIMEOUT_MS).emitWithAck("join", "check-room");
  socket.emit("publish", "check-room", "check");
});
