// The realtime client: authenticates, resubscribes after every reconnect, backs off on failures.
// onState(state, detail): state is "connecting", "live", "reconnecting" or "offline" (after several failed
// attempts in a row, or while the browser is offline; it keeps retrying, `retryNow()` retries at once).
const OFFLINE_AFTER = 5;

export class Realtime {
  constructor(url, getToken, { onEvent, onState, onOpen }) {
    this.url = url;
    this.getToken = getToken;
    this.onEvent = onEvent;
    this.onState = onState;
    this.onOpen = onOpen;
    this.socket = null;
    this.nextId = 1;
    this.delay = 500;
    this.failures = 0;
    this.timer = null;
    this.stopped = false;
    this.nextAttempt = null;
  }

  async connect() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.timer = null;
    if (this.failures === 0) this.onState("connecting");
    let token;
    try {
      token = await this.getToken();
    } catch (err) {
      return this.retry(`cannot get a token: ${err.message}`);
    }
    if (this.stopped) return;
    const socket = new WebSocket(`${this.url}?token=${encodeURIComponent(token)}`);
    this.socket = socket;
    socket.addEventListener("open", () => {
      this.delay = 500;
      this.failures = 0;
      this.onState("live");
      this.onOpen();
    });
    socket.addEventListener("message", (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      this.onEvent(event);
    });
    socket.addEventListener("close", (e) => {
      if (this.socket !== socket || this.stopped) return;
      this.socket = null;
      this.retry(`closed ${e.code}${e.reason ? `: ${e.reason}` : ""}`);
    });
  }

  retry(reason) {
    this.failures += 1;
    const delay = this.delay;
    this.delay = Math.min(this.delay * 2, 10000);
    this.nextAttempt = Date.now() + delay;
    const offline = this.failures >= OFFLINE_AFTER || navigator.onLine === false;
    this.onState(offline ? "offline" : "reconnecting", reason);
    this.timer = setTimeout(() => this.connect(), delay + Math.random() * 250);
  }

  retryNow() {
    if (this.socket || this.stopped) return;
    this.delay = 500;
    this.connect();
  }

  close() {
    this.stopped = true;
    clearTimeout(this.timer);
    const socket = this.socket;
    this.socket = null;
    socket?.close(1000);
  }

  send(frame) {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(frame));
  }

  // `since`: the `ts` (as received) of the last event seen; the gateway first sends the readings stored
  // after it (gap-free resume), so a reconnect loses nothing. `types`: only these event types
  // (docs/realtime.md), e.g. ["alert"] with ["*"] for the tenant's alerts without its telemetry.
  subscribe(devices, { metrics, since, types } = {}) {
    const frame = { type: "subscribe", id: this.nextId++, devices };
    if (metrics) frame.metrics = metrics;
    if (since) frame.since = since;
    if (types) frame.types = types;
    this.send(frame);
  }

  unsubscribe(devices) {
    this.send({ type: "unsubscribe", id: this.nextId++, devices });
  }
}
