// A small client of the platform's REST API (docs/api.md).
export class Api {
  constructor(base) {
    this.base = base.replace(/\/$/, "");
    this.accessToken = null;
    this.refreshToken = null;
    this.apiKey = null;
  }

  useKey(key) {
    this.apiKey = key;
  }

  headers() {
    const headers = { "Content-Type": "application/json" };
    if (this.apiKey) headers["X-API-Key"] = this.apiKey;
    else if (this.accessToken) headers.Authorization = `Bearer ${this.accessToken}`;
    return headers;
  }

  async request(method, path, body, retry = true, extraHeaders = {}) {
    const response = await fetch(this.base + path, {
      method,
      headers: { ...this.headers(), ...extraHeaders },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401 && retry && this.refreshToken) {
      await this.refresh();
      return this.request(method, path, body, false, extraHeaders);
    }
    const data = response.status === 204 ? null : await response.json();
    if (!response.ok) {
      const error = new Error(data?.detail || data?.title || `${method} ${path}: ${response.status}`);
      error.status = response.status;
      throw error;
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

  async realtimeToken() {
    if (this.apiKey) return this.apiKey;
    return (await this.request("POST", "/api/v1/realtime/token")).token;
  }

  async devices() {
    return (await this.request("GET", "/api/v1/devices?limit=200")).items;
  }

  async history(deviceId, from, to) {
    const query = new URLSearchParams({ from: from.toISOString(), to: to.toISOString(), order: "asc", limit: "5000" });
    return (await this.request("GET", `/api/v1/devices/${encodeURIComponent(deviceId)}/telemetry?${query}`)).items;
  }

  async recentAlerts() {
    return (await this.request("GET", "/api/v1/alerts?limit=20")).items;
  }

  async state(deviceId) {
    return this.request("GET", `/api/v1/devices/${encodeURIComponent(deviceId)}/state`);
  }

  // A merge patch of the desired state, only if the state is still at `version` (412 otherwise).
  async patchDesired(deviceId, desired, version) {
    const path = `/api/v1/devices/${encodeURIComponent(deviceId)}/state`;
    return this.request("PATCH", path, { desired }, true, { "If-Match": `"${version}"` });
  }

  async sendCommand(deviceId, name, params) {
    return this.request("POST", `/api/v1/devices/${encodeURIComponent(deviceId)}/commands`, { name, params });
  }
}
