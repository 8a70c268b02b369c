// A small client of the platform's REST API (docs/api.md).
export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

const enc = encodeURIComponent;

export class Api {
  constructor(base) {
    this.base = base.replace(/\/$/, "");
    this.accessToken = null;
    this.refreshToken = null;
    this.apiKey = null;
    this.tenantId = null; // a platform admin acting in another tenant (X-Tenant-Id)
  }

  useKey(key) {
    this.apiKey = key;
  }

  headers(extra) {
    const headers = { "Content-Type": "application/json", ...extra };
    if (this.apiKey) headers["X-API-Key"] = this.apiKey;
    else if (this.accessToken) headers.Authorization = `Bearer ${this.accessToken}`;
    if (this.tenantId) headers["X-Tenant-Id"] = this.tenantId;
    return headers;
  }

  async request(method, path, body, retry = true, extraHeaders = undefined) {
    const response = await fetch(this.base + path, {
      method,
      headers: this.headers(extraHeaders),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401 && retry && this.refreshToken) {
      await this.refresh();
      return this.request(method, path, body, false, extraHeaders);
    }
    const text = response.status === 204 ? "" : await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const detail = data?.detail || data?.title || `${method} ${path}: ${response.status}`;
      throw new ApiError(detail, response.status);
    }
    return data;
  }

  async login(email, password) {
    const data = await this.request("POST", "/api/v1/auth/login", { email, password }, false);
    this.accessToken = data.access_token;
    this.refreshToken = data.refresh_token;
  }

  async refresh() {
    const data = await this.request("POST", "/api/v1/auth/refresh", { refresh_token: this.refreshToken }, false);
    this.accessToken = data.access_token;
    this.refreshToken = data.refresh_token || this.refreshToken;
  }

  async logout() {
    if (this.refreshToken) await this.request("POST", "/api/v1/auth/logout", { refresh_token: this.refreshToken }, false);
  }

  me() {
    return this.request("GET", "/api/v1/auth/me");
  }

  async tenants() {
    return (await this.request("GET", "/api/v1/tenants?limit=500")).items;
  }

  async realtimeToken() {
    if (this.apiKey) return this.apiKey;
    return (await this.request("POST", "/api/v1/realtime/token")).token;
  }

  // One page of devices: {items, has_more, next_cursor}; filters q, status, type.
  devicePage({ q, status, type, cursor, limit = 50 }) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (q) query.set("q", q);
    if (status) query.set("status", status);
    if (type) query.set("type", type);
    if (cursor) query.set("cursor", cursor);
    return this.request("GET", `/api/v1/devices?${query}`);
  }

  device(id) {
    return this.request("GET", `/api/v1/devices/${enc(id)}`);
  }

  latest(id) {
    return this.request("GET", `/api/v1/devices/${enc(id)}/latest`);
  }

  // Raw points, newest first (so a cut page loses the oldest, never the right edge).
  async raw(deviceId, from, to, limit = 10000) {
    const query = new URLSearchParams({ from: from.toISOString(), to: to.toISOString(), order: "desc", limit: String(limit) });
    return (await this.request("GET", `/api/v1/devices/${enc(deviceId)}/telemetry?${query}`)).items;
  }

  // Buckets of one metric: [{ts, avg, min, max}], oldest first.
  async buckets(deviceId, metric, bucket, from, to) {
    const query = new URLSearchParams({
      metric,
      bucket,
      agg: "avg,min,max",
      from: from.toISOString(),
      to: to.toISOString(),
    });
    return (await this.request("GET", `/api/v1/devices/${enc(deviceId)}/telemetry?${query}`)).points;
  }

  alerts({ state, limit = 50 } = {}) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (state) query.set("state", state);
    return this.request("GET", `/api/v1/alerts?${query}`);
  }

  ackAlert(id, note) {
    return this.request("POST", `/api/v1/alerts/${enc(id)}/ack`, note ? { note } : undefined);
  }

  async rules() {
    return (await this.request("GET", "/api/v1/alert-rules?limit=200")).items;
  }

  setRuleEnabled(id, enabled) {
    return this.request("PATCH", `/api/v1/alert-rules/${enc(id)}`, { enabled });
  }

  rejects({ device_id, reason, cursor, limit = 50 }) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (device_id) query.set("device_id", device_id);
    if (reason) query.set("reason", reason);
    if (cursor) query.set("cursor", cursor);
    return this.request("GET", `/api/v1/ingest/rejects?${query}`);
  }

  async commands(deviceId) {
    return (await this.request("GET", `/api/v1/devices/${enc(deviceId)}/commands?limit=10`)).items;
  }

  sendCommand(deviceId, name, params) {
    return this.request("POST", `/api/v1/devices/${enc(deviceId)}/commands`, { name, params });
  }

  // Whether the API offers device state: its OpenAPI document lists the path (asked once; an API without
  // it would answer each GET with a 404, which a browser logs as an error).
  async hasState() {
    if (this.stateSupported === undefined) {
      try {
        const response = await fetch(`${this.base}/api/docs/openapi.json`, { credentials: "omit" });
        const doc = response.ok ? await response.json() : { paths: {} };
        this.stateSupported = Object.keys(doc.paths || {}).some((path) => /^\/api\/v1\/devices\/\{[^}]+\}\/state$/.test(path));
      } catch {
        this.stateSupported = false;
      }
    }
    return this.stateSupported;
  }

  // Desired vs reported state (docs/device-state.md); null when the API has no state endpoint.
  async state(deviceId) {
    if (!(await this.hasState())) return null;
    return this.request("GET", `/api/v1/devices/${enc(deviceId)}/state`);
  }

  // A merge patch of the desired state, only if the state is still at `version` (412 otherwise).
  patchDesired(deviceId, desired, version) {
    const path = `/api/v1/devices/${enc(deviceId)}/state`;
    return this.request("PATCH", path, { desired }, true, { "If-Match": `"${version}"` });
  }

  credentials(deviceId) {
    return this.request("GET", `/api/v1/devices/${enc(deviceId)}/credentials`);
  }

  rotateCredentials(deviceId) {
    return this.request("POST", `/api/v1/devices/${enc(deviceId)}/credentials`);
  }

  revokeCredentials(deviceId) {
    return this.request("DELETE", `/api/v1/devices/${enc(deviceId)}/credentials`);
  }

  async users() {
    return (await this.request("GET", "/api/v1/users?limit=200")).items;
  }

  createUser(email, password, role) {
    return this.request("POST", "/api/v1/users", { email, password, role });
  }

  async apiKeys() {
    return (await this.request("GET", "/api/v1/api-keys")).items;
  }

  createKey(name, scopes) {
    return this.request("POST", "/api/v1/api-keys", { name, scopes });
  }

  revokeKey(id) {
    return this.request("DELETE", `/api/v1/api-keys/${enc(id)}`);
  }
}
