/*
 * corral.js: a browser client for corral's WebSocket gateway (/ws), served by every
 * daemon that runs the websocket manager at /corral.js. No dependencies, no build step.
 *
 *   <script src="https://daemon.example/corral.js"></script>
 *   <script>
 *     const client = new Corral({
 *       urls: ["wss://a.example/ws", "wss://b.example/ws"],   // tried in turn
 *       token: () => fetch("/token").then((r) => r.text()),   // or a string
 *     });
 *     client.join("chat:7", (event, data, frame) => console.log(event, data));
 *     client.on("gap", (room) => reloadRoom(room));
 *   </script>
 *
 * The client reconnects by itself (the next URL, exponential backoff with jitter), joins
 * its rooms again with the last offset and epoch it saw, so that the daemon sends what it
 * missed meanwhile (or a "gap" when history no longer holds it), and never hands the same
 * offset of a room to its handler twice. When the daemon asks for a fresh token
 * ("refresh_required") it gets one from `token` and refreshes in band, without reconnecting.
 *
 * Events (client.on(name, fn)): "open" (the welcome frame), "close" (the close event),
 * "gap" (room, frame), "refreshed" (frame), "presence" (frame), "error" (frame or Error).
 */
(function (root) {
  "use strict";

  const UNAUTHORIZED = 4401;

  class Corral {
    constructor(options) {
      const urls = options.urls || [options.url];
      if (!urls.length || !urls[0]) throw new TypeError("Corral: give urls (or url)");
      if (!options.token) throw new TypeError("Corral: give a token (a string or a function)");
      this.urls = urls.slice();
      this.token = options.token;
      this.minDelay = options.minDelay ?? 250;
      this.maxDelay = options.maxDelay ?? 5000;
      this.requestTimeout = options.requestTimeout ?? 10000;
      this.state = "connecting";
      this.url = null;
      this.connectionId = null;
      this.rooms = new Map();
      this._listeners = new Map();
      this._pending = new Map();
      this._nextId = 1;
      this._urlIndex = 0;
      this._attempt = 0;
      this._socket = null;
      this._timer = null;
      this._open();
    }

    // -- public API ----------------------------------------------------------------

    on(name, fn) {
      if (!this._listeners.has(name)) this._listeners.set(name, new Set());
      this._listeners.get(name).add(fn);
      return () => this._listeners.get(name).delete(fn);
    }

    /** Join `room`; `handler(event, data, frame)` gets each message. Resolves to "joined". */
    join(room, handler) {
      const entry = this.rooms.get(room) || { offset: null, epoch: null, waiting: null };
      entry.handler = handler;
      this.rooms.set(room, entry);
      const joined = new Deferred();
      if (this.state === "open") this._join(room, entry, joined);
      else entry.waiting = joined; // sent once the daemon says welcome
      return joined.promise;
    }

    leave(room) {
      this.rooms.delete(room);
      return this.state === "open" ? this._request({ type: "leave", room }) : Promise.resolve();
    }

    publish(room, event, data) {
      return this._request({ type: "publish", room, event, data });
    }

    presence(room) {
      return this._request({ type: "presence", room });
    }

    history(room, since, epoch) {
      return this._request({ type: "history", room, since, epoch });
    }

    ping() {
      return this._request({ type: "ping" });
    }

    close() {
      this.state = "closed";
      clearTimeout(this._timer);
      if (this._socket) this._socket.close(1000, "bye");
      this._failPending(new Error("closed"));
    }

    // -- the socket ----------------------------------------------------------------

    async _open() {
      let token;
      try {
        token = await this._token();
      } catch (error) {
        this._emit("error", error);
        this._retry();
        return;
      }
      if (this.state === "closed") return;
      const url = this.urls[this._urlIndex % this.urls.length];
      const socket = new WebSocket(url);
      this._socket = socket;
      this.url = url;
      // The token goes in the first frame, not the URL, so that it stays out of logs.
      socket.onopen = () => socket.send(JSON.stringify({ type: "auth", token }));
      socket.onmessage = (event) => {
        if (socket === this._socket) this._frame(JSON.parse(event.data));
      };
      socket.onclose = (event) => {
        if (socket === this._socket) this._lost(event);
      };
    }

    _lost(event) {
      this._socket = null;
      this.connectionId = null;
      this._failPending(new Error(`disconnected (${event.code})`));
      this._emit("close", event);
      if (this.state === "closed") return;
      this.state = "connecting";
      if (event.code === UNAUTHORIZED && typeof this.token !== "function") {
        this.state = "closed"; // a fixed token the daemon refuses will not get better
        return;
      }
      this._urlIndex += 1;
      this._retry();
    }

    _retry() {
      const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** this._attempt);
      this._attempt += 1;
      this._timer = setTimeout(() => this._open(), ceiling / 2 + (Math.random() * ceiling) / 2);
    }

    async _token() {
      return typeof this.token === "function" ? await this.token() : this.token;
    }

    _send(frame) {
      this._socket.send(JSON.stringify(frame));
    }

    _request(frame) {
      if (this.state !== "open") return Promise.reject(new Error("not connected"));
      const id = this._nextId++;
      const deferred = new Deferred();
      deferred.timer = setTimeout(() => {
        this._pending.delete(id);
        deferred.reject(new Error(`no answer to ${frame.type} in ${this.requestTimeout} ms`));
      }, this.requestTimeout);
      this._pending.set(id, deferred);
      this._send({ ...frame, id });
      return deferred.promise;
    }

    _failPending(error) {
      for (const deferred of this._pending.values()) {
        clearTimeout(deferred.timer);
        deferred.reject(error);
      }
      this._pending.clear();
    }

    _join(room, entry, joined) {
      const frame = { type: "join", room };
      if (entry.offset !== null) Object.assign(frame, { since: entry.offset, epoch: entry.epoch });
      this._request(frame).then(
        (answer) => {
          if (answer.recovered === undefined || answer.recovered === null) {
            entry.offset = answer.offset;
            entry.epoch = answer.epoch;
          }
          joined.resolve(answer);
        },
        (error) => {
          joined.reject(error);
          this._emit("error", error);
        },
      );
    }

    async _refresh() {
      try {
        const token = await this._token();
        if (this.state === "open") this._send({ type: "refresh", token });
      } catch (error) {
        this._emit("error", error);
      }
    }

    // -- frames from the daemon ----------------------------------------------------

    _frame(frame) {
      const waiting = frame.id !== undefined ? this._pending.get(frame.id) : undefined;
      if (waiting) {
        this._pending.delete(frame.id);
        clearTimeout(waiting.timer);
        if (frame.type === "error") waiting.reject(Object.assign(new Error(frame.message), frame));
        else waiting.resolve(frame);
        return;
      }
      switch (frame.type) {
        case "welcome":
          this.state = "open";
          this._attempt = 0;
          this.connectionId = frame.connection_id;
          this._emit("open", frame);
          for (const [room, entry] of this.rooms) {
            this._join(room, entry, entry.waiting || new Deferred());
            entry.waiting = null;
          }
          break;
        case "message":
          this._message(frame);
          break;
        case "gap": {
          const entry = this.rooms.get(frame.room);
          if (entry) Object.assign(entry, { offset: frame.offset, epoch: frame.epoch });
          this._emit("gap", frame.room, frame);
          break;
        }
        case "refresh_required":
          this._refresh();
          break;
        case "refreshed":
          this._emit("refreshed", frame);
          break;
        case "join":
        case "leave":
          this._emit("presence", frame);
          break;
        case "error":
          this._emit("error", frame);
          break;
        default:
          break;
      }
    }

    _message(frame) {
      const entry = this.rooms.get(frame.room);
      if (!entry) return;
      if (entry.epoch === frame.epoch && entry.offset !== null && frame.offset <= entry.offset) {
        return; // already handed over: recovery and live delivery overlap
      }
      entry.offset = frame.offset;
      entry.epoch = frame.epoch;
      try {
        entry.handler(frame.event, frame.data, frame);
      } catch (error) {
        this._emit("error", error);
      }
    }

    _emit(name, ...args) {
      for (const fn of this._listeners.get(name) || []) {
        try {
          fn(...args);
        } catch (error) {
          if (name !== "error") this._emit("error", error);
        }
      }
    }
  }

  class Deferred {
    constructor() {
      this.promise = new Promise((resolve, reject) => {
        this.resolve = resolve;
        this.reject = reject;
      });
      this.promise.catch(() => {}); // a join retried on reconnect need not be awaited
    }
  }

  root.Corral = Corral;
})(globalThis);
