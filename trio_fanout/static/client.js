// The trio-fanout browser client: one ES module, no dependencies. Every worker serves it at
// /client.js (and its type declarations at /client.d.ts). See docs/browser-client.md.
//
// It keeps one WebSocket to a trio-fanout server alive by itself: it notices a dead connection
// from missing heartbeats, reconnects with exponential backoff and full jitter, rejoins its
// rooms, and on a server that speaks protocol version 2 asks for the messages it missed
// (`join` with `since`) and delivers each message of a room at most once, in offset order.
// Where the server requires tokens, it sends one as its first frame (`auth`) on every
// connection, and a fresh one (`refresh`) whenever the server says the current one expires.
// Without a token it sends a `ping` first, and stops for good if the server closes with 4001:
// that server requires a token, and every attempt would be refused the same way.

/** Defaults of {@link FanoutClientOptions}, each with its reason. */
const DEFAULTS = Object.freeze({
  // The first retry waits up to half a second: long enough not to hammer a restarting worker
  // with every browser at once, short enough that a user barely notices.
  backoffBaseMs: 500,
  // Retries never wait more than 20 s, so a server that comes back is found again quickly.
  backoffCapMs: 20_000,
  // A connection that stayed up this long was a good one: the next retry starts from the base.
  stableAfterMs: 10_000,
  // The master sends a heartbeat every heartbeat_interval; three missed in a row is a dead
  // connection rather than a late frame.
  heartbeatMisses: 3,
  // ... but never less than this, so a very short interval does not misjudge a busy tab.
  heartbeatFloorMs: 2_000,
  // A handshake and welcome that take longer than this are given up and retried.
  connectTimeoutMs: 10_000,
  // A publish whose ack has not come in this long is reported as failed.
  publishTimeoutMs: 10_000,
  // For a server that requires tokens: a token, or a function returning one (or a promise of
  // one), called on every connection and on every token_expiring so that it can fetch a fresh
  // token from the application's own server. It goes in the first frame, never in the URL,
  // which proxies and servers write to their access logs.
  token: null,
});

/** A refused or failed request: `code` is a protocol error code (`bad_room`, `forbidden`, …)
 * or one of the client's own: `disconnected`, `timeout`, `closed`, `left`, `token_required`. */
export class FanoutError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = "FanoutError";
    /** @type {string} */
    this.code = code;
  }
}

/**
 * A client that stays connected to a trio-fanout server until {@link FanoutClient#close}.
 *
 * Events (see {@link FanoutClient#on}): `connected`, `disconnected`, `reconnecting`, `joined`,
 * `recovered`, `unrecovered`, `broadcast`, `error`.
 */
export class FanoutClient {
  /**
   * Start connecting to `url` (`ws://HOST:PORT/ws` or `wss://…`) at once.
   * @param {string} url
   * @param {Partial<typeof DEFAULTS>} [options]
   */
  constructor(url, options = {}) {
    /** @readonly */
    this.url = url;
    /** @readonly */
    this.options = Object.freeze({ ...DEFAULTS, ...options });
    /** `connecting`, `connected`, `waiting` (to reconnect) or `closed`. */
    this.state = "connecting";
    /** The current welcome frame's fields, or null while not connected. */
    this.welcome = null;
    /** What the server answered to the current token (`sub`, `exp`), or null. */
    this.auth = null;
    /** @type {Map<string, Room>} the rooms the application is in, joined or still joining. */
    this._rooms = new Map();
    /** @type {Map<number, Pending>} requests awaiting their reply, by id. */
    this._pending = new Map();
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
    this._nextId = 1;
    this._attempt = 0; // failed connections since the last stable one
    this._socket = null;
    this._connectedAt = 0;
    this._lastFrameAt = 0;
    this._deadline = 0; // ms without any frame after which the connection counts as dead
    this._timer = null; // the watchdog, or the wait before the next attempt
    this._connect();
  }

  /**
   * Listen to an event; returns a function that stops listening.
   * @param {string} event
   * @param {Function} listener
   * @returns {() => void}
   */
  on(event, listener) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(listener);
    return () => this.off(event, listener);
  }

  /**
   * Stop listening.
   * @param {string} event
   * @param {Function} listener
   */
  off(event, listener) {
    this._listeners.get(event)?.delete(listener);
  }

  /**
   * Join `room` and deliver its messages to `onMessage(data, {room, offset})`. The room is kept
   * across reconnects until {@link FanoutClient#leave}. Resolves on the server's `joined`
   * (sent once connected, if not connected yet); rejects with a {@link FanoutError} if the
   * server refuses the join, which then forgets the room.
   * @param {string} room
   * @param {(data: unknown, meta: {room: string, offset: number | null}) => void} onMessage
   * @returns {Promise<{room: string, epoch: string | null, offset: number | null}>}
   */
  join(room, onMessage) {
    if (this.state === "closed") return Promise.reject(closedError());
    if (this._rooms.has(room)) {
      return Promise.reject(new FanoutError("already_joined", `already in room ${room}`));
    }
    return new Promise((resolve, reject) => {
      this._rooms.set(room, {
        onMessage,
        epoch: null, // from the server's joined; null on a server without version 2
        offset: 0, // the last offset delivered (or the room's latest at the join)
        joinedOnce: false,
        waiter: { resolve, reject }, // the application's join promise, until its joined
      });
      if (this.state === "connected") this._sendJoin(room);
    });
  }

  /**
   * Leave `room`: its callback gets nothing more at once. Resolves when the server confirms,
   * or at once while not connected (the membership ended with the connection).
   * @param {string} room
   * @returns {Promise<void>}
   */
  leave(room) {
    const state = this._rooms.get(room);
    if (!state) return Promise.resolve();
    this._rooms.delete(room);
    state.waiter?.reject(new FanoutError("left", `left room ${room} before it was joined`));
    if (this.state !== "connected") return Promise.resolve();
    // "not_member" (the join had not been sent yet) is as good as "left".
    return this._request({ type: "leave", room }, 0).catch((error) => {
      if (error.code !== "not_member" && error.code !== "disconnected") throw error;
    }).then(() => undefined);
  }

  /**
   * Publish `data` (any JSON value) to `room`. Resolves with the offset the server gave it (null
   * on a server without version 2) once the server acknowledged it; rejects with a
   * {@link FanoutError}: the server's refusal (`bad_room`, `rate_limited`, …), `timeout` after
   * `timeoutMs`, or `disconnected` at once while not connected or if the connection ends first
   * (then the message may or may not have been delivered).
   * @param {string} room
   * @param {unknown} data
   * @param {{echo?: boolean, timeoutMs?: number}} [options]
   * @returns {Promise<{offset: number | null}>}
   */
  publish(room, data, { echo, timeoutMs } = {}) {
    if (this.state !== "connected") {
      return Promise.reject(
        this.state === "closed" ? closedError() : new FanoutError("disconnected", "not connected")
      );
    }
    const frame = { type: "publish", room, data };
    if (echo !== undefined) frame.echo = echo;
    return this._request(frame, timeoutMs ?? this.options.publishTimeoutMs).then((ack) => ({
      offset: typeof ack.offset === "number" ? ack.offset : null,
    }));
  }

  /** Close for good: no more reconnects; pending requests reject with `closed`. */
  close() {
    this._stop(closedError());
  }

  /** Stop for good (state `closed`): pending requests and joins reject with `error`. */
  _stop(error) {
    if (this.state === "closed") return;
    this.state = "closed";
    clearTimeout(this._timer);
    this._abandonSocket(1000);
    this._failPending(error);
    for (const state of this._rooms.values()) state.waiter?.reject(error);
    this._rooms.clear();
  }

  // ---- the connection -------------------------------------------------------------------

  _connect() {
    this.state = "connecting";
    let socket;
    try {
      socket = new WebSocket(this.url);
    } catch (error) {
      // A malformed URL will not get better by retrying: report it and stop.
      this._emit("error", { code: "bad_url", message: String(error) });
      this.close();
      return;
    }
    this._socket = socket;
    socket.onmessage = (event) => this._onFrame(event.data);
    socket.onclose = (event) => this._onDisconnect(event.code, event.reason);
    // An error is always followed by a close event, which does the work.
    socket.onerror = () => {};
    this._arm(this.options.connectTimeoutMs, "no welcome in time");
  }

  /** (Re)start the watchdog: no frame for `ms` ends the connection. */
  _arm(ms, reason) {
    this._lastFrameAt = Date.now();
    this._deadline = ms;
    clearTimeout(this._timer);
    const check = () => {
      const quiet = Date.now() - this._lastFrameAt;
      if (quiet >= this._deadline) this._onDisconnect(null, reason);
      else this._timer = setTimeout(check, this._deadline - quiet);
    };
    this._timer = setTimeout(check, ms);
  }

  /** Stop listening to the socket and close it without waiting for its closing handshake,
   * which a dead peer never completes (browsers then wait up to a minute). */
  _abandonSocket(code) {
    const socket = this._socket;
    if (!socket) return;
    this._socket = null;
    socket.onmessage = socket.onclose = socket.onerror = null;
    socket.close(code);
  }

  /** The connection ended (close event, or watchdog with `code` null): plan the next one. */
  _onDisconnect(code, reason) {
    if (this.state === "closed") return;
    this._abandonSocket(4000); // 4000, a private code: "this client gave up on the connection"
    clearTimeout(this._timer);
    const wasConnected = this.state === "connected";
    this.welcome = null;
    this.auth = null;
    if (code === 4001 && this.options.token === null) {
      // The server requires a token and the client has none to give: every attempt would be
      // refused the same way. Stop, and say why.
      const error = new FanoutError(
        "token_required",
        `the server requires a token (it closed the connection with 4001: ${reason}); ` +
          "give the client a token option"
      );
      this._stop(error);
      if (wasConnected) this._emit("disconnected", { code, reason, delayMs: null });
      this._emit("error", { room: null, code: error.code, message: error.message });
      return;
    }
    if (code === 4001) {
      // The server refused the token, or it expired without a refresh: the next connection
      // asks the token option again; the application may want to sign the user in again.
      this._emit("error", { room: null, code: "unauthenticated", message: reason });
    }
    this._failPending(new FanoutError("disconnected", "the connection ended"));
    if (wasConnected && Date.now() - this._connectedAt >= this.options.stableAfterMs) {
      this._attempt = 0;
    }
    // Full jitter: anywhere between 0 and the exponential bound, so that clients dropped
    // together (a worker died) do not come back together.
    const bound = Math.min(
      this.options.backoffCapMs,
      this.options.backoffBaseMs * 2 ** this._attempt
    );
    const delayMs = Math.round(Math.random() * bound);
    this._attempt += 1;
    this.state = "waiting";
    if (wasConnected) this._emit("disconnected", { code, reason, delayMs });
    this._emit("reconnecting", { attempt: this._attempt, delayMs });
    this._timer = setTimeout(() => this._connect(), delayMs);
  }

  /** @param {unknown} text */
  _onFrame(text) {
    this._lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(String(text));
    } catch {
      return; // the server sends only JSON; nothing to do with anything else
    }
    switch (frame.type) {
      case "welcome":
        return this._onWelcome(frame);
      case "message":
        return this._onMessage(frame);
      case "joined":
        if (frame.id === undefined || frame.id === null) return this._onNewEpoch(frame);
        return this._settle(frame.id, (pending) => pending.resolve(frame));
      case "ack":
      case "left":
      case "pong":
      case "authed":
        return this._settle(frame.id, (pending) => pending.resolve(frame));
      case "error":
        return this._onError(frame);
      case "token_expiring":
        return this._refresh();
      default:
        return; // heartbeat (its arrival was the point), or a frame from a newer version
    }
  }

  _onWelcome(frame) {
    // A server that requires a token sends nothing more (heartbeats included) until it has it:
    // the connect timeout's watchdog stays armed until the first answer.
    const socket = this._socket;
    const token = this.options.token;
    const answered =
      token === null
        ? // No token: a ping first. A server that requires one closes 4001 at once, where
          // waiting would only look like a dead connection.
          this._request({ type: "ping" }, 0).then(() => null)
        : this._freshToken().then((fresh) => {
            if (socket !== this._socket) return undefined; // given up meanwhile
            return this._request({ type: "auth", token: fresh }, 0);
          });
    answered.then(
      (authed) => {
        if (authed === undefined || socket !== this._socket) return;
        if (authed !== null) this.auth = { sub: authed.sub, exp: authed.exp };
        this._onConnected(frame);
      },
      (error) => {
        if (token !== null && error.code === "unknown_type" && socket === this._socket) {
          // A server that does not use tokens (or speaks version 1): the connection serves
          // without one. Said once a connection, since the application meant to give one.
          this._emit("error", {
            room: null,
            code: "unknown_type",
            message: "the server takes no tokens: connected without one",
          });
          this._onConnected(frame);
          return;
        }
        // A refused token closes the connection (4001), which does the rest.
        if (error.code !== "disconnected" && socket === this._socket) {
          this._emit("error", { room: null, code: error.code ?? "token", message: String(error.message) });
          this._onDisconnect(
            null,
            token === null ? "the server refused the first ping" : "no token to authenticate with"
          );
        }
      }
    );
  }

  /** The token for the next `auth` or `refresh`, from the `token` option. */
  async _freshToken() {
    const option = this.options.token;
    const token = typeof option === "function" ? await option() : option;
    if (typeof token !== "string" || token === "") {
      throw new FanoutError("token", "the token option gave no token (a non-empty string)");
    }
    return token;
  }

  /** Answer the server's `token_expiring` with a fresh token. Nobody waits for the answer: if
   * the refresh fails, the server closes the connection at the old token's `exp` (4001) and
   * the client reconnects, asking the token option again. */
  _refresh() {
    const socket = this._socket;
    this._freshToken()
      .then((token) => {
        if (socket !== this._socket || this.state !== "connected") return null;
        return this._request({ type: "refresh", token }, 0);
      })
      .then(
        (authed) => {
          if (authed !== null && socket === this._socket) {
            this.auth = { sub: authed.sub, exp: authed.exp };
          }
        },
        (error) => {
          if (error.code !== "disconnected") {
            this._emit("error", { room: null, code: error.code ?? "token", message: String(error.message) });
          }
        }
      );
  }

  _onConnected(frame) {
    this.state = "connected";
    this.welcome = { worker: frame.worker, pid: frame.pid, heartbeatInterval: frame.heartbeat_interval };
    this._connectedAt = Date.now();
    const intervalMs = (frame.heartbeat_interval || 0) * 1000;
    if (intervalMs > 0) {
      this._arm(
        Math.max(this.options.heartbeatFloorMs, this.options.heartbeatMisses * intervalMs),
        "missed heartbeats"
      );
    } else {
      clearTimeout(this._timer); // a server without heartbeats: only the close event tells
    }
    this._emit("connected", { ...this.welcome });
    for (const room of this._rooms.keys()) this._sendJoin(room);
  }

  // ---- rooms ----------------------------------------------------------------------------

  _sendJoin(room) {
    const state = this._rooms.get(room);
    const frame = { type: "join", room };
    // Version 2: ask for what was missed, from the last message delivered.
    const since = state.joinedOnce && state.epoch !== null;
    if (since) frame.since = { epoch: state.epoch, offset: state.offset };
    this._request(frame, 0).then(
      (joined) => this._onRoomJoined(room, state, joined, since),
      (error) => this._onJoinRefused(room, state, error)
    );
  }

  _onRoomJoined(room, state, joined, since) {
    if (this._rooms.get(room) !== state) return; // left (or left and joined again) meanwhile
    const epoch = typeof joined.epoch === "string" ? joined.epoch : null;
    const offset = typeof joined.offset === "number" ? joined.offset : null;
    const recovered = since ? joined.recovered === true : null;
    if (!recovered) {
      // Nothing older than the join will come: start counting from the room's latest offset.
      // (Recovered, the missed messages follow, after the offset we keep.)
      state.epoch = epoch;
      state.offset = offset ?? 0;
    }
    const rejoin = state.joinedOnce;
    state.joinedOnce = true;
    state.waiter?.resolve({ room, epoch, offset });
    state.waiter = null;
    this._emit("joined", { room, epoch, offset, rejoin, recovered });
    if (recovered === true) this._emit("recovered", { room, epoch, offset });
    if (recovered === false) this._emit("unrecovered", { room, epoch, offset });
  }

  /** The server's unasked `joined` (version 2): the room's numbering started again (its
   * sequencer restarted, or its history expired), or the server missed messages it could not
   * read back; either way messages may have been lost. */
  _onNewEpoch(frame) {
    const state = this._rooms.get(frame.room);
    if (!state || typeof frame.epoch !== "string" || typeof frame.offset !== "number") return;
    state.epoch = frame.epoch;
    state.offset = frame.offset;
    this._emit("unrecovered", { room: frame.room, epoch: frame.epoch, offset: frame.offset });
  }

  _onJoinRefused(room, state, error) {
    if (this._rooms.get(room) !== state || error.code === "disconnected") return; // rejoined later
    if (state.waiter) {
      // The application's own join: it hears the refusal, and the room is forgotten.
      this._rooms.delete(room);
      state.waiter.reject(error);
    } else if (error.code === "backplane_unavailable" || error.code === "rate_limited") {
      // A rejoin refused for a passing reason: try again on a new connection, with backoff.
      this._onDisconnect(null, `rejoin of ${room} refused: ${error.code}`);
    } else {
      this._rooms.delete(room);
      this._emit("error", { room, code: error.code, message: error.message });
    }
  }

  _onMessage(frame) {
    if (typeof frame.room !== "string") {
      this._emit("broadcast", { data: frame.data });
      return;
    }
    const state = this._rooms.get(frame.room);
    if (!state) return; // left already
    const offset = typeof frame.offset === "number" ? frame.offset : null;
    if (offset !== null) {
      if (offset <= state.offset) return; // delivered already (the server promises it never is)
      state.offset = offset;
    }
    try {
      state.onMessage(frame.data, { room: frame.room, offset });
    } catch (error) {
      report(error);
    }
  }

  // ---- requests -------------------------------------------------------------------------

  /** Send `frame` with a fresh id; resolves with the reply frame, rejects with a FanoutError.
   * A `timeoutMs` of 0 waits as long as the connection lasts. */
  _request(frame, timeoutMs) {
    const id = this._nextId++;
    let text;
    try {
      text = JSON.stringify({ ...frame, id });
    } catch (error) {
      // Data that JSON cannot hold (a BigInt, a cycle): the application's mistake, not the server's.
      return Promise.reject(error);
    }
    return new Promise((resolve, reject) => {
      const pending = { resolve, reject, timer: null };
      if (timeoutMs > 0) {
        pending.timer = setTimeout(() => {
          this._pending.delete(id);
          reject(new FanoutError("timeout", `no answer to ${frame.type} in ${timeoutMs} ms`));
        }, timeoutMs);
      }
      this._pending.set(id, pending);
      this._socket.send(text);
    });
  }

  _settle(id, action) {
    const pending = this._pending.get(id);
    if (!pending) return;
    this._pending.delete(id);
    clearTimeout(pending.timer);
    action(pending);
  }

  _onError(frame) {
    const error = new FanoutError(frame.code, frame.message);
    if (this._pending.has(frame.id)) this._settle(frame.id, (pending) => pending.reject(error));
    else this._emit("error", { room: null, code: frame.code, message: frame.message });
  }

  _failPending(error) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const { reject, timer } of pending) {
      clearTimeout(timer);
      reject(error);
    }
  }

  _emit(event, detail) {
    for (const listener of [...(this._listeners.get(event) ?? [])]) {
      try {
        listener(detail);
      } catch (error) {
        report(error);
      }
    }
  }
}

/**
 * A client for `url`; with no `url`, the `/ws` of the server that served the page.
 * @param {string} [url]
 * @param {Partial<typeof DEFAULTS>} [options]
 * @returns {FanoutClient}
 */
export function connect(url, options) {
  const base = location.protocol === "https:" ? `wss://${location.host}` : `ws://${location.host}`;
  return new FanoutClient(url ?? `${base}/ws`, options);
}

function closedError() {
  return new FanoutError("closed", "the client was closed");
}

/** An application callback threw: report it like an uncaught error, and carry on. */
function report(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else setTimeout(() => { throw error; });
}

/**
 * @typedef {object} Room
 * @property {Function} onMessage
 * @property {string | null} epoch
 * @property {number} offset
 * @property {boolean} joinedOnce
 * @property {{resolve: Function, reject: Function} | null} waiter
 *
 * @typedef {object} Pending
 * @property {Function} resolve
 * @property {Function} reject
 * @property {ReturnType<typeof setTimeout> | null} timer
 */
