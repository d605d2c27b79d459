// Publish to a trio-fanout room through the admin port's HTTP API from Node.js (18 or later:
// fetch is built in), with no dependency:
//
//   node examples/publish_api.mjs http://127.0.0.1:9100 api.key lobby '{"text": "hi"}'
//
// prints the offset the room gave the message.

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

const [adminUrl, keyFile, room, data] = process.argv.slice(2);
if (data === undefined) {
  console.error("usage: node publish_api.mjs ADMIN_URL KEY_FILE ROOM JSON_DATA");
  process.exit(2);
}
const key = (await readFile(keyFile, "utf8")).trim();
try {
  const answer = await publish(adminUrl, key, room, JSON.parse(data));
  console.log(`published to ${room} at offset ${answer.offset}`);
} catch (error) {
  console.error(error.message);
  process.exit(1);
}
