// The page's only way to its server: HTTP for one-off requests, one WebSocket for decoding and status.
//
// Decoding is organised in channels ("main", "other", "traverse"...). Each channel has at most one request
// in flight; a newer request replaces the waiting one (latest wins), so a fast drag never builds a queue and
// the image always catches up with the pointer.

export async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw Object.assign(new Error(body.error || `HTTP ${response.status}`), { body });
  return body;
}

export async function postJSON(url, payload) {
  const response = await fetch(url, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload),
  });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw Object.assign(new Error(body.error || `HTTP ${response.status}`), { body });
  return body;
}

export function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

export function bytesToBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i++) binary += String.fromCharCode(bytes[i]);
  return btoa(binary);
}

export class Link {
  constructor({ onStatus, onConnection }) {
    this.onStatus = onStatus;
    this.onConnection = onConnection;
    this.channels = new Map(); // name -> {inflight: Map id -> request, waiting, last, shown, limit}
    // Decodes in flight on the socket, all channels together: the server answers one past its bound with
    // RESOURCE_EXHAUSTED, so the page keeps under it (the bound comes in the status message, max_decodes).
    this.socketLimit = 4;
    this.nextId = 1;
    this.ws = null;
    this.connect();
  }

  connect() {
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onopen = () => {
      this.onConnection(true);
      for (const name of this.channels.keys()) this.pump(name);
    };
    ws.onmessage = (event) => this.receive(JSON.parse(event.data));
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.onConnection(false);
      for (const channel of this.channels.values()) {
        // whatever was in flight on this socket is lost: ask again for the newest
        if (channel.inflight.size) { channel.waiting = channel.waiting || channel.last; channel.inflight.clear(); }
      }
      setTimeout(() => this.connect(), 1000);
    };
  }

  receive(message) {
    if (message.op === "status") {
      if (message.max_decodes > 0) this.socketLimit = message.max_decodes;
      this.onStatus(message.services);
      return;
    }
    const channel = this.channels.get(message.channel);
    if (!channel) return;
    const request = channel.inflight.get(message.id);
    if (!request) return;
    channel.inflight.delete(message.id);
    request.roundTrip = performance.now() - request.sentAt;
    if (message.op === "error" && message.code === "RESOURCE_EXHAUSTED") {
      // refused for the socket's bound, not for what it asked: ask again, unless something newer waits
      if (!channel.waiting) channel.waiting = request;
      setTimeout(() => this.pumpAll(message.channel), 100);
      return;
    }
    this.pumpAll(message.channel);    // send the waiting requests before painting: overlap the round trip
    if (message.id < channel.shown) return; // a newer reply was already shown
    channel.shown = message.id;
    request.callback(message, request);
  }

  // Ask for `latents` (array of arrays) decoded by `model` ({name, version}: the version the page shows, so
  // that images and labels agree while a newer one appears); `callback(reply, request)` gets the images.
  // `inflight` > 1 lets a new request go out before the previous reply is back (replies older than one
  // already shown are dropped), which trims the wait behind a slow reply while dragging.
  decode(channelName, model, latents, callback, meta = {}, inflight = 1) {
    if (!this.channels.has(channelName)) {
      this.channels.set(channelName, { inflight: new Map(), waiting: null, last: null, shown: 0, limit: inflight });
    }
    const channel = this.channels.get(channelName);
    channel.limit = inflight;
    channel.waiting = { model, latents, callback, meta };
    this.pump(channelName);
  }

  // A slot came free: this channel's waiting request first, then the others'.
  pumpAll(first) {
    this.pump(first);
    for (const name of this.channels.keys()) if (name !== first) this.pump(name);
  }

  inflight() {
    let n = 0;
    for (const channel of this.channels.values()) n += channel.inflight.size;
    return n;
  }

  pump(channelName) {
    const channel = this.channels.get(channelName);
    if (!channel || channel.inflight.size >= channel.limit || !channel.waiting) return;
    if (this.inflight() >= this.socketLimit) return;
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    const request = channel.waiting;
    const id = this.nextId++;
    channel.waiting = null;
    channel.last = request;
    channel.inflight.set(id, request);
    request.sentAt = performance.now();
    this.ws.send(JSON.stringify({
      op: "decode", id, channel: channelName, model: request.model.name, version: request.model.version,
      latents: request.latents,
    }));
  }
}
