// A small SignalR client (JSON hub protocol) for the Switchboard chat page.
//
// It negotiates (version 1), connects over WebSockets and falls back to long
// polling when a WebSocket cannot be opened, performs the handshake, sends
// keep-alive pings and watches the server's, and reconnects by itself with
// exponential backoff and jitter. On WebSockets it asks for stateful
// reconnect (SignalR 8): messages both ways are numbered and kept until the
// other side acknowledges them, so when the socket drops (a network blip, a
// cut tunnel, the balancer's upgrade) one immediate new socket to the same
// connection resumes it and nothing is lost or repeated; only if that fails
// does it start over with a new connection. No library is downloaded: the page must work
// offline from the node, so this file is the whole client. Only what the chat
// hub uses is implemented: invocations with and without a result, events,
// pings and Close. Everything received is handed to callers as data; nothing
// here touches the DOM.
"use strict";

const RECORD_SEPARATOR = "\x1e";
const MessageType = {
  Invocation: 1,
  StreamItem: 2,
  Completion: 3,
  StreamInvocation: 4,
  CancelInvocation: 5,
  Ping: 6,
  Close: 7,
  Ack: 8,
  Sequence: 9,
};

/** The messages stateful reconnect numbers (the official HubInvocationMessage types). */
function isSequenced(type) {
  return type >= MessageType.Invocation && type <= MessageType.CancelInvocation;
}

/** Splits a text frame into JSON records (each ends with 0x1E). */
function parseRecords(text) {
  const parts = text.split(RECORD_SEPARATOR);
  parts.pop(); // whatever follows the last separator is empty (or incomplete)
  return parts;
}

/** The Authorization header for a sign-in token, if there is one. */
function bearer(accessToken) {
  return accessToken ? { Authorization: "Bearer " + accessToken } : {};
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** WebSocket transport: one socket, text frames. */
class WebSocketTransport {
  constructor(url, token, accessToken) {
    const u = new URL(url);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    u.searchParams.set("id", token);
    // Browsers cannot set headers on a WebSocket: the sign-in token rides in
    // the query, as Microsoft's client does.
    if (accessToken) u.searchParams.set("access_token", accessToken);
    this.url = u.toString();
    this.name = "WebSockets";
    this.onreceive = () => {};
    this.onclose = () => {};
  }

  connect() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      let opened = false;
      ws.onopen = () => {
        opened = true;
        this.ws = ws;
        resolve();
      };
      ws.onmessage = (e) => this.onreceive(typeof e.data === "string" ? e.data : "");
      ws.onclose = (e) => {
        if (!opened) reject(new Error("WebSocket failed to connect (code " + e.code + ")"));
        else this.onclose(e.wasClean ? null : new Error("WebSocket closed with code " + e.code));
      };
    });
  }

  send(text) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return Promise.reject(new Error("WebSocket is not open"));
    this.ws.send(text);
    return Promise.resolve();
  }

  stop() {
    if (this.ws) this.ws.close(1000);
  }
}

/** Long polling transport: GET polls receive, POSTs send, DELETE ends it. */
class LongPollingTransport {
  constructor(url, token, accessToken) {
    const u = new URL(url);
    u.searchParams.set("id", token);
    this.url = u.toString();
    this.headers = bearer(accessToken);
    this.name = "LongPolling";
    this.onreceive = () => {};
    this.onclose = () => {};
    this.running = false;
    this.sendQueue = Promise.resolve();
    this.abort = new AbortController();
  }

  async poll() {
    const u = new URL(this.url);
    u.searchParams.set("_", String(Date.now()));
    const resp = await fetch(u, {
      cache: "no-store",
      credentials: "same-origin",
      headers: this.headers,
      signal: this.abort.signal,
    });
    if (resp.status === 204) return null; // the server ended the connection
    if (!resp.ok) throw new Error("poll failed with HTTP " + resp.status);
    return await resp.text();
  }

  async connect() {
    // The first poll answers at once; it proves the connection exists.
    const first = await this.poll();
    if (first === null) throw new Error("the server refused the long-polling connection");
    this.running = true;
    this.loop();
  }

  async loop() {
    let error = null;
    while (this.running) {
      try {
        const text = await this.poll();
        if (text === null) break;
        if (text.length > 0) this.onreceive(text);
      } catch (e) {
        if (this.running) error = e;
        break;
      }
    }
    const wasRunning = this.running;
    this.running = false;
    if (wasRunning) this.onclose(error);
  }

  send(text) {
    // The server allows one POST at a time per connection, so sends queue.
    const next = this.sendQueue.then(async () => {
      const resp = await fetch(this.url, { method: "POST", body: text, credentials: "same-origin", headers: this.headers });
      if (!resp.ok) throw new Error("send failed with HTTP " + resp.status);
    });
    this.sendQueue = next.catch(() => {});
    return next;
  }

  stop() {
    if (!this.running) return;
    this.running = false;
    this.abort.abort();
    fetch(this.url, { method: "DELETE", credentials: "same-origin", headers: this.headers, keepalive: true }).catch(
      () => {},
    );
  }
}

/**
 * A hub connection that stays connected: after a loss it reconnects with
 * backoff and jitter until `stop()` is called.
 *
 * States: "connecting", "connected", "reconnecting", "offline" (the last one
 * after several failed attempts or while the browser reports no network; it
 * keeps retrying, more slowly), and "unauthorized" when the server refuses the
 * sign-in token (401/403): it stops until started again with a new token.
 */
class HubConnection {
  constructor(url, options = {}) {
    this.url = new URL(url, location.href).toString();
    this.transports = options.transports || ["WebSockets", "LongPolling"];
    this.keepAliveMs = options.keepAliveMs || 15000;
    this.serverTimeoutMs = options.serverTimeoutMs || 30000;
    this.handshakeTimeoutMs = options.handshakeTimeoutMs || 15000;
    this.maxDelayMs = options.maxDelayMs || 30000;
    this.offlineAfter = options.offlineAfter || 5;
    // A JWT sent with every request when set (see the node's `auth` setting).
    this.accessToken = options.accessToken || null;
    this.handlers = new Map();
    this.pending = new Map();
    this.nextInvocationId = 1;
    this.state = "disconnected";
    this.stopped = true;
    this.transport = null;
    this.transportName = null;
    this.connectionId = null;
    this.onstatechange = () => {};
    this.onconnected = () => {};
    this.onclosed = () => {};
    this.wakeUp = null;
    window.addEventListener("online", () => this.wakeUp && this.wakeUp());
  }

  /** Registers a handler for a server-to-client method (case-insensitive). */
  on(method, handler) {
    this.handlers.set(method.toLowerCase(), handler);
  }

  setState(state, detail) {
    this.state = state;
    this.onstatechange(state, detail);
  }

  /** Connects, and keeps reconnecting after losses until stop(). */
  async start() {
    this.stopped = false;
    this.setState("connecting");
    await this.reconnectLoop(false);
  }

  async stop() {
    this.stopped = true;
    if (this.wakeUp) this.wakeUp();
    this.teardown(new Error("connection stopped"));
    this.setState("disconnected");
  }

  /** Delay before retry `attempt` (0-based): exponential, capped, ±50% jitter. */
  retryDelay(attempt) {
    const base = Math.min(this.maxDelayMs, 500 * Math.pow(2, attempt));
    return Math.round(base * (0.5 + Math.random()));
  }

  async reconnectLoop(reconnecting) {
    for (let attempt = 0; !this.stopped; attempt++) {
      if (reconnecting || attempt > 0) {
        const delay = this.retryDelay(attempt);
        const offline = attempt >= this.offlineAfter || navigator.onLine === false;
        this.setState(offline ? "offline" : "reconnecting", { attempt: attempt + 1, delayMs: delay });
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, delay);
          this.wakeUp = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        this.wakeUp = null;
        if (this.stopped) return;
      }
      try {
        await this.connectOnce();
        this.setState("connected", { transport: this.transportName, reconnected: reconnecting || attempt > 0 });
        this.onconnected(reconnecting || attempt > 0);
        return;
      } catch (e) {
        this.teardown(e);
        this.lastError = e;
        if (e.status === 401 || e.status === 403) {
          // Retrying with the same token cannot help: wait for a new one.
          this.stopped = true;
          this.setState("unauthorized", { message: e.message });
          return;
        }
      }
    }
  }

  /** Asks for an immediate retry (the "retry now" button, or network back). */
  retryNow() {
    if (this.wakeUp) this.wakeUp();
  }

  async negotiate() {
    // The hub URL's own query (e.g. messageIds=true) goes to negotiate too.
    const u = new URL(this.url);
    u.pathname = u.pathname.replace(/\/?$/, "/negotiate");
    u.searchParams.set("negotiateVersion", "1");
    u.searchParams.set("useStatefulReconnect", "true");
    const resp = await fetch(u, {
      method: "POST",
      cache: "no-store",
      credentials: "same-origin",
      headers: bearer(this.accessToken),
    });
    if (!resp.ok) {
      const why = (await resp.text().catch(() => "")).trim();
      const error = new Error("negotiate failed with HTTP " + resp.status + (why ? ": " + why : ""));
      error.status = resp.status;
      throw error;
    }
    const body = await resp.json();
    if (body.error) throw new Error("negotiate refused: " + body.error);
    return body;
  }

  /** One attempt: negotiate, open the first transport that works, handshake. */
  async connectOnce() {
    let lastError = new Error("no transport available");
    for (const name of this.transports) {
      if (this.stopped) throw new Error("connection stopped");
      if (name === "WebSockets" && typeof WebSocket === "undefined") continue;
      // A fresh negotiate per transport: a token whose transport failed may
      // already be bound to it on the server.
      const negotiation = await this.negotiate();
      const offered = (negotiation.availableTransports || []).some((t) => t.transport === name);
      if (!offered) continue;
      const token = negotiation.connectionToken || negotiation.connectionId;
      const transport =
        name === "WebSockets"
          ? new WebSocketTransport(this.url, token, this.accessToken)
          : new LongPollingTransport(this.url, token, this.accessToken);
      // Stateful reconnect only where the server offered it, and only on WebSockets.
      const stateful = negotiation.useStatefulReconnect === true && name === "WebSockets";
      try {
        await this.startTransport(transport, stateful);
        this.connectionId = negotiation.connectionId;
        this.token = token;
        this.transportName = name;
        return;
      } catch (e) {
        transport.onclose = () => {};
        transport.stop();
        lastError = e;
      }
    }
    throw lastError;
  }

  async startTransport(transport, stateful) {
    this.stateful = stateful ? new Sequencer() : null;
    let handshakeDone;
    let handshakeFailed;
    const handshake = new Promise((resolve, reject) => {
      handshakeDone = resolve;
      handshakeFailed = reject;
    });
    let buffered = "";
    let shaken = false;
    transport.onreceive = (text) => {
      this.lastReceived = Date.now();
      if (!shaken) {
        buffered += text;
        const end = buffered.indexOf(RECORD_SEPARATOR);
        if (end < 0) return;
        let response;
        try {
          response = JSON.parse(buffered.slice(0, end));
        } catch (e) {
          handshakeFailed(new Error("malformed handshake response"));
          return;
        }
        if (response.error) {
          handshakeFailed(new Error("handshake refused: " + response.error));
          return;
        }
        shaken = true;
        const rest = buffered.slice(end + 1);
        buffered = "";
        handshakeDone();
        if (rest) this.dispatch(rest);
        return;
      }
      this.dispatch(text);
    };
    transport.onclose = (error) => {
      if (!shaken) handshakeFailed(error || new Error("connection closed during the handshake"));
      else this.connectionLost(transport, error);
    };
    await transport.connect();
    this.transport = transport;
    // Version 2 tells the server we speak Ack and Sequence.
    await transport.send(JSON.stringify({ protocol: "json", version: stateful ? 2 : 1 }) + RECORD_SEPARATOR);
    const timeout = sleep(this.handshakeTimeoutMs).then(() => {
      throw new Error("no handshake response within " + this.handshakeTimeoutMs + " ms");
    });
    try {
      await Promise.race([handshake, timeout]);
    } catch (e) {
      this.transport = null;
      throw e;
    }
    this.lastReceived = Date.now();
    this.lastSent = Date.now();
    this.timer = setInterval(() => this.tick(), 1000);
  }

  /** Keep-alive: ping when we have been quiet; give up on a silent server. */
  tick() {
    const now = Date.now();
    if (now - this.lastReceived > this.serverTimeoutMs) {
      this.connectionLost(this.transport, new Error("server timeout: nothing received for " + this.serverTimeoutMs + " ms"));
      return;
    }
    if (now - this.lastSent >= this.keepAliveMs) this.sendRecord({ type: MessageType.Ping }).catch(() => {});
  }

  dispatch(text) {
    for (const record of parseRecords(text)) {
      let msg;
      try {
        msg = JSON.parse(record);
      } catch (e) {
        console.warn("ignoring a malformed hub message", e);
        continue;
      }
      if (this.stateful && !this.stateful.shouldProcess(msg, () => this.scheduleAck())) {
        if (this.stateful.failed) {
          this.connectionLost(this.transport, new Error(this.stateful.failed), true);
          return;
        }
        continue;
      }
      switch (msg.type) {
        case MessageType.Invocation: {
          const handler = this.handlers.get(String(msg.target).toLowerCase());
          if (handler) {
            try {
              handler(...(msg.arguments || []));
            } catch (e) {
              console.error("handler for " + msg.target + " failed", e);
            }
          }
          break;
        }
        case MessageType.Completion: {
          const waiter = this.pending.get(msg.invocationId);
          if (waiter) {
            this.pending.delete(msg.invocationId);
            if (msg.error) waiter.reject(new Error(msg.error));
            else waiter.resolve(msg.result);
          }
          break;
        }
        case MessageType.Close: {
          const error = msg.error ? new Error("server closed the connection: " + msg.error) : null;
          if (msg.allowReconnect) this.connectionLost(this.transport, error || new Error("the server asked us to reconnect"));
          else {
            this.stopped = true;
            this.teardown(error || new Error("the server closed the connection"));
            this.setState("offline", { error: error ? error.message : "closed by the server" });
            this.onclosed(error);
          }
          break;
        }
        default:
          break; // pings and unknown types only prove the server is alive
      }
    }
  }

  /** Tears the transport down and fails every pending invocation. */
  teardown(error) {
    clearInterval(this.timer);
    this.timer = null;
    if (this.transport) {
      const t = this.transport;
      this.transport = null;
      t.onclose = () => {};
      t.stop();
    }
    for (const waiter of this.pending.values()) waiter.reject(error);
    this.pending.clear();
  }

  connectionLost(transport, error, noResume) {
    // Only the live transport can be lost, once: later records of the same
    // frame, or a late close event, must not start a second reconnect loop.
    if (!transport || transport !== this.transport || this.stopped) return;
    // A WebSocket that dropped without a close (error set) may resume.
    if (this.stateful && error && !noResume && transport instanceof WebSocketTransport) {
      this.resume(transport, error);
      return;
    }
    this.teardown(error || new Error("connection lost"));
    this.lastError = error;
    this.reconnectLoop(true);
  }

  /**
   * Stateful reconnect: one immediate new socket to the same connection.
   * Messages sent meanwhile wait in the buffer; pending invocations stay
   * pending. If the socket cannot be opened the connection starts over.
   */
  async resume(old, error) {
    this.resuming = true;
    clearInterval(this.timer);
    this.timer = null;
    old.onclose = () => {};
    const transport = new WebSocketTransport(this.url, this.token, this.accessToken);
    transport.onreceive = (text) => {
      this.lastReceived = Date.now();
      this.dispatch(text);
    };
    transport.onclose = (e) => this.connectionLost(transport, e, true);
    this.transport = transport;
    // Until the server's Sequence arrives on the new socket, ignore everything.
    this.stateful.disconnected();
    try {
      await transport.connect();
    } catch (e) {
      this.resuming = false;
      this.transport = old;
      this.connectionLost(old, error, true);
      return;
    }
    if (this.transport !== transport || this.stopped) return;
    const resend = this.stateful.resend();
    try {
      for (const text of resend) await transport.send(text);
    } catch (e) {
      this.resuming = false;
      this.connectionLost(transport, e, true);
      return;
    }
    this.resuming = false;
    this.resumes = (this.resumes || 0) + 1;
    this.lastReceived = Date.now();
    this.lastSent = Date.now();
    this.timer = setInterval(() => this.tick(), 1000);
  }

  /** Acknowledges what arrived, at most once a second, like the official client. */
  scheduleAck() {
    if (this.ackTimer) return;
    this.ackTimer = setTimeout(() => {
      this.ackTimer = null;
      if (!this.stateful || this.resuming || !this.transport) return;
      const text = JSON.stringify({ type: MessageType.Ack, sequenceId: this.stateful.latestReceived }) + RECORD_SEPARATOR;
      this.transport.send(text).catch(() => {});
    }, 1000);
  }

  sendRecord(message) {
    if (!this.transport || this.state !== "connected") return Promise.reject(new Error("not connected"));
    this.lastSent = Date.now();
    const text = JSON.stringify(message) + RECORD_SEPARATOR;
    if (this.stateful && isSequenced(message.type)) {
      this.stateful.sent(text);
      // While resuming, the buffer is resent on the new socket.
      if (this.resuming) return Promise.resolve();
    } else if (this.resuming) {
      return Promise.resolve(); // pings are not needed meanwhile
    }
    return this.transport.send(text);
  }

  /** Calls a hub method and resolves with its result. */
  invoke(method, ...args) {
    const invocationId = String(this.nextInvocationId++);
    return new Promise((resolve, reject) => {
      this.pending.set(invocationId, { resolve, reject });
      this.sendRecord({ type: MessageType.Invocation, invocationId, target: method, arguments: args }).catch((e) => {
        this.pending.delete(invocationId);
        reject(e);
      });
    });
  }

  /** Calls a hub method without waiting for a result. */
  send(method, ...args) {
    return this.sendRecord({ type: MessageType.Invocation, target: method, arguments: args });
  }
}

/**
 * The client half of stateful reconnect (the official MessageBuffer): what
 * we send is numbered and kept until the server's Ack; what we receive is
 * counted, duplicates after a resume are dropped, and after a resume
 * everything waits for the server's Sequence.
 */
class Sequencer {
  constructor() {
    this.buffer = []; // [{ id, text }] not yet acknowledged
    this.totalSent = 0;
    this.nextReceiving = 1;
    this.latestReceived = 0;
    this.waitForSequence = false;
    this.failed = null;
  }

  sent(text) {
    this.totalSent++;
    this.buffer.push({ id: this.totalSent, text });
  }

  /** Whether the hub should act on `msg`; Ack and Sequence are handled here. */
  shouldProcess(msg, onNew) {
    if (this.waitForSequence) {
      if (msg.type !== MessageType.Sequence) return false;
      this.waitForSequence = false;
    }
    if (msg.type === MessageType.Sequence) {
      if (msg.sequenceId > this.nextReceiving) {
        this.failed = "Sequence ID greater than amount of messages we've received.";
        return false;
      }
      this.nextReceiving = msg.sequenceId;
      return false;
    }
    if (msg.type === MessageType.Ack) {
      this.buffer = this.buffer.filter((m) => m.id > msg.sequenceId);
      return false;
    }
    if (!isSequenced(msg.type)) return true;
    const current = this.nextReceiving++;
    if (current <= this.latestReceived) return false; // a duplicate after a resume
    this.latestReceived = current;
    onNew();
    return true;
  }

  disconnected() {
    this.waitForSequence = true;
  }

  /** What to send first on a resumed socket: Sequence, then the buffer. */
  resend() {
    const first = this.buffer.length ? this.buffer[0].id : this.totalSent + 1;
    const sequence = JSON.stringify({ type: MessageType.Sequence, sequenceId: first }) + RECORD_SEPARATOR;
    return [sequence, ...this.buffer.map((m) => m.text)];
  }
}

window.SignalR = { HubConnection };
