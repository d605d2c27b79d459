// Publish to a trio-fanout room through the admin port's HTTP API from Node.js (18 or later:
// fetch is built in), with no dependency:
//
//   node examples/publish_api.mjs http://127.0.0.1:9100 api.key lobby '{"text": "hi"}'
//
// prints the offset the room gave the message. Without ROOM, every connection receives it:
//
//   node examples/publish_api.mjs http://127.0.0.1:9100 api.key '"maintenance in 5 minutes"'

import { readFile } from "node:fs/promises";

export async function publish(adminUrl, key, room, data) {
  const response = await fetch(new URL("/api/publish", adminUrl), {
    method: "POST",
    headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
    body: JSON.stringify(room === null ? { data } : { room, data }),
  });
  const answer = await response.json();
  if (!response.ok) {
    // 400 (bad room or data), 401 (wrong key), 503 (backplane down): the body says why.
    throw new Error(`publish refused (${response.status}): ${answer.message}`);
  }
  return answer; // { room, epoch, offset }
}

const args = process.argv.slice(2);
if (args.length !== 3 && args.length !== 4) {
  console.error("usage: node publish_api.mjs ADMIN_URL KEY_FILE [ROOM] JSON_DATA");
  process.exit(2);
}
const [adminUrl, keyFile] = args;
const [room, data] = args.length === 4 ? args.slice(2) : [null, args[2]];
try {
  const key = (await readFile(keyFile, "utf8")).trim();
  const answer = await publish(adminUrl, key, room, JSON.parse(data));
  const done = room === null ? "sent to every connection" : `published to ${room} at offset`;
  console.log(room === null ? done : `${done} ${answer.offset}`);
} catch (error) {
  console.error(error.message);
  process.exit(1);
}
