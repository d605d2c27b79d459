// Type declarations of the trio-fanout browser client (client.js). See docs/browser-client.md.

/** Settings of a client; every field is optional. */
export interface FanoutClientOptions {
  /** Upper bound of the first reconnect delay, in ms (default 500). */
  backoffBaseMs: number;
  /** Upper bound of any reconnect delay, in ms (default 20000). */
  backoffCapMs: number;
  /** A connection that stayed up this long resets the backoff, in ms (default 10000). */
  stableAfterMs: number;
  /** Heartbeat intervals without any frame after which the connection is dead (default 3). */
  heartbeatMisses: number;
  /** The least time without any frame that counts as a dead connection, in ms (default 2000). */
  heartbeatFloorMs: number;
  /** Time allowed for the handshake and the welcome, in ms (default 10000). */
  connectTimeoutMs: number;
  /** Time a publish waits for its ack, in ms (default 10000). */
  publishTimeoutMs: number;
  /** For a server that requires tokens: a token (a JWT), or a function returning one or a
   * promise of one, called on every connection and whenever the server announces the current
   * token's expiry (default null: no token). Sent as a frame, never in the URL. */
  token: string | (() => string | Promise<string>) | null;
}

/** The connection's state: trying to connect, connected (welcome received, and the token's
 * `authed` or the first ping's `pong`), waiting before the next attempt, or closed for good (by
 * the application, or after `token_required`). */
export type FanoutState = "connecting" | "connected" | "waiting" | "closed";

/** The error codes of a rejected promise: the server's (see docs/protocol.md) and the client's. */
export type FanoutErrorCode =
  | "bad_json"
  | "bad_frame"
  | "unknown_type"
  | "bad_room"
  | "not_member"
  | "too_large"
  | "too_many_rooms"
  | "rate_limited"
  | "forbidden"
  | "backplane_unavailable"
  /** publish while not connected, or the connection ended before the answer */
  | "disconnected"
  /** no answer in time */
  | "timeout"
  /** the client was closed */
  | "closed"
  /** the room was left before its join was answered */
  | "left"
  /** join of a room this client is already in */
  | "already_joined"
  /** the URL could not be used (the client then closes) */
  | "bad_url"
  /** the token option threw, or gave no token */
  | "token"
  /** the server refused the token, or it expired without a refresh (close code 4001) */
  | "unauthenticated"
  /** the server requires a token and the client has none (close code 4001 with `token: null`):
   * the client has stopped */
  | "token_required";

export class FanoutError extends Error {
  readonly name: "FanoutError";
  readonly code: FanoutErrorCode | string;
}

/** The fields of the current connection's welcome frame. */
export interface Welcome {
  worker: number;
  pid: number;
  /** Seconds between the master's heartbeats (0: none). */
  heartbeatInterval: number;
}

/** Where a room's numbering stands: `epoch` and `offset` are null on a server without
 * protocol version 2. */
export interface RoomPosition {
  room: string;
  epoch: string | null;
  offset: number | null;
}

export interface MessageMeta {
  room: string;
  /** The message's offset in its room (null on a server without protocol version 2). */
  offset: number | null;
}

export interface FanoutEvents {
  /** A connection is up (its welcome arrived, then the answer to the token, or without a token
   * the pong to a first ping); the rooms are being rejoined. */
  connected: Welcome;
  /** A connection that was up ended; `code` is the close code, null when the client gave up on
   * it (missed heartbeats, a rejoin refused for a passing reason). `delayMs` is the wait before
   * the next attempt, null when there is none (`token_required`: the client has stopped). */
  disconnected: { code: number | null; reason: string; delayMs: number | null };
  /** The next attempt to connect starts in `delayMs`; `attempt` counts since the last stable
   * connection. */
  reconnecting: { attempt: number; delayMs: number };
  /** A room was joined: by `join`, or again after a reconnect (`rejoin`). `recovered` is null
   * when the join asked for nothing missed (a first join, or a server without version 2). */
  joined: RoomPosition & { rejoin: boolean; recovered: boolean | null };
  /** A rejoin with `since` got every missed message, delivered before any newer one. */
  recovered: RoomPosition;
  /** A rejoin with `since` could not recover what was missed (the room's numbering restarted or
   * the gap is older than the server keeps), or the server said unasked that the room's
   * numbering started again: messages may be missing, the application should reload its
   * state. */
  unrecovered: RoomPosition;
  /** A message to every connection (without a room). */
  broadcast: { data: unknown };
  /** An error frame that answers no pending request, or a rejoin refused for good (`room` is
   * then the room, which the client has left); `unauthenticated` when the server closed the
   * connection for its token (the client reconnects, asking the token option again), `token`
   * when the token option failed, `token_required` when the server requires a token and the
   * client has none (close code 4001 with `token: null`): the client has stopped for good (state
   * `closed`), and its pending joins and publishes reject with the same code. */
  error: { room: string | null; code: FanoutErrorCode | string; message: string };
}

export class FanoutClient {
  /** Start connecting to `url` (`ws://HOST:PORT/ws` or `wss://…`) at once. */
  constructor(url: string, options?: Partial<FanoutClientOptions>);
  readonly url: string;
  readonly options: Readonly<FanoutClientOptions>;
  readonly state: FanoutState;
  /** The current connection's welcome, or null while not connected. */
  readonly welcome: Welcome | null;
  /** What the server answered to the current token, or null (no token, or not connected). */
  readonly auth: { sub: string; exp: number } | null;

  /** Listen to an event; returns a function that stops listening. */
  on<E extends keyof FanoutEvents>(event: E, listener: (detail: FanoutEvents[E]) => void): () => void;
  off<E extends keyof FanoutEvents>(event: E, listener: (detail: FanoutEvents[E]) => void): void;

  /** Join `room`, kept across reconnects until `leave`; `onMessage` gets each of its messages
   * once. Resolves on the server's `joined`; rejects with a FanoutError if refused. */
  join(room: string, onMessage: (data: unknown, meta: MessageMeta) => void): Promise<RoomPosition>;

  /** Leave `room`; nothing more is delivered from it. */
  leave(room: string): Promise<void>;

  /** Publish `data` to `room`. Resolves with its offset once acknowledged; rejects with a
   * FanoutError (the server's refusal, `timeout`, or `disconnected`). */
  publish(
    room: string,
    data: unknown,
    options?: { echo?: boolean; timeoutMs?: number },
  ): Promise<{ offset: number | null }>;

  /** Close for good: no more reconnects; pending promises reject with `closed`. */
  close(): void;
}

/** A client for `url`; with no `url`, the `/ws` of the server that served the page. */
export function connect(url?: string, options?: Partial<FanoutClientOptions>): FanoutClient;
