// The realtime client: authenticates, resubscribes after every reconnect, backs off on failures.
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
  }

  async connect() {
    let token;
    try {
      token = await this.getToken();
    } catch (err) {
      this.onState(`Realtime: cannot get a token (${err.message}); retrying`);
      return this.retry();
    }
    const socket = new WebSocket(`${this.url}?token=${encodeURIComponent(token)}`);
    this.socket = socket;
    socket.addEventListener("open", () => {
      this.delay = 500;
      this.onState("Live");
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
      if (this.socket !== socket) return;
      this.onState(`Realtime disconnected (${e.code}${e.reason ? `: ${e.reason}` : ""}); reconnecting`);
      this.retry();
    });
  }

  retry() {
    const delay = this.delay;
    this.delay = Math.min(this.delay * 2, 10000);
    setTimeout(() => this.connect(), delay + Math.random() * 250);
  }

  send(frame) {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(frame));
  }

  // `since`: the `ts` (as received) of the last event seen; the gateway first sends the readings stored
  // after it (gap-free resume), so a reconnect loses nothing.
  subscribe(devices, metrics, since) {
    const frame = { type: "subscribe", id: this.nextId++, devices };
    if (metrics) frame.metrics = metrics;
    if (since) frame.since = since;
    this.send(frame);
  }

  unsubscribe(devices) {
    this.send({ type: "unsubscribe", id: this.nextId++, devices });
  }
}
