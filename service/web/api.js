// The public REST/SSE API, nothing else. SSE is read from fetch() bodies (not EventSource) so the
// API key header can be sent; a dropped stream is resumed with Last-Event-ID.

const KEY = "sr3d.apiKey"; // sessionStorage: this tab only

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  constructor(onNeedKey) {
    this.onNeedKey = onNeedKey; // async (rejected: bool) => key | null
  }

  get key() { return sessionStorage.getItem(KEY) || ""; }
  set key(v) { v ? sessionStorage.setItem(KEY, v) : sessionStorage.removeItem(KEY); }

  headers(extra = {}) {
    const h = { ...extra };
    if (this.key) h["Authorization"] = `Bearer ${this.key}`;
    return h;
  }

  /** fetch() with the key. A 401 asks for a key (saying "rejected" when one was sent) and retries
   * with it, until the server takes one or the person dismisses the dialog. Errors become ApiError. */
  async request(path, init = {}) {
    let res;
    for (;;) {
      const sent = this.key;
      res = await fetch(path, { ...init, headers: this.headers(init.headers || {}) });
      if (res.status !== 401) break;
      const key = await this.onNeedKey(Boolean(sent));
      if (!key) {
        if (sent) this.key = ""; // refused and not replaced: stop sending it
        break;
      }
      this.key = key;
    }
    if (!res.ok) {
      let code = `http_${res.status}`, message = res.statusText;
      try {
        const body = await res.json();
        if (body && body.error) ({ code, message } = body.error);
      } catch { /* not JSON */ }
      throw new ApiError(res.status, code, message);
    }
    return res;
  }

  /** Whether this tab may call the API: "ok", "required" (no key sent, the server wants one) or
   * "rejected" (the key sent was refused). Probes GET /v1/models: authenticated, cheap, and 200 for
   * anyone allowed in (a probe of a made-up job id would log a 404 on every load). */
  async access() {
    const sent = this.key;
    const res = await fetch("/v1/models", { headers: this.headers() });
    if (res.status !== 401) return "ok";
    return sent ? "rejected" : "required";
  }

  async job(id) { return (await this.request(`/v1/spatial-qa/${id}`)).json(); }

  async cancel(id) { return this.request(`/v1/spatial-qa/${id}`, { method: "DELETE" }); }

  async scene(id) { return (await this.request(`/v1/spatial-qa/${id}/scene`)).arrayBuffer(); }

  /**
   * Submit (multipart FormData) and follow the job's events to the end, resuming by itself.
   * handlers: { onEvent(ev), onJob(id), onReconnect(attempt) }. `signal` aborts the reading only.
   */
  async ask(form, handlers, signal) {
    const res = await this.request("/v1/spatial-qa", {
      method: "POST", body: form, headers: { Accept: "text/event-stream" }, signal,
    });
    const loc = res.headers.get("Location");
    let jobId = loc ? loc.split("/").pop() : null;
    if (jobId) handlers.onJob(jobId);
    let last = null;
    let terminal = false;
    const seen = (ev) => {
      if (ev.id) last = ev.id;
      if (ev.event === "queued" && ev.data.job_id && !jobId) { jobId = ev.data.job_id; handlers.onJob(jobId); }
      if (ev.event === "done" || ev.event === "error") terminal = true;
      handlers.onEvent(ev);
    };
    try {
      await readSSE(res, seen, signal);
    } catch (e) {
      if (signal && signal.aborted) throw e;
    }
    // Dropped before the end: resume from the last event id, with back-off, until terminal.
    for (let attempt = 1; !terminal; attempt++) {
      if (signal && signal.aborted) throw new DOMException("aborted", "AbortError");
      if (!jobId) throw new ApiError(0, "stream_lost", "the stream dropped before the job id arrived");
      handlers.onReconnect && handlers.onReconnect(attempt);
      await sleep(Math.min(500 * 2 ** (attempt - 1), 8000));
      try {
        const headers = { Accept: "text/event-stream" };
        if (last) headers["Last-Event-ID"] = last;
        const r = await this.request(`/v1/spatial-qa/${jobId}/events`, { headers, signal });
        await readSSE(r, seen, signal);
      } catch (e) {
        if (signal && signal.aborted) throw e;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500) throw e; // gone / not ours: stop
      }
    }
    return jobId;
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Parse an SSE body (text/event-stream) into {id, event, data(JSON)} callbacks. */
export async function readSSE(res, onEvent, signal) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  const onAbort = () => reader.cancel().catch(() => {});
  signal && signal.addEventListener("abort", onAbort, { once: true });
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const ev = parseBlock(block);
        if (ev) onEvent(ev);
      }
    }
  } finally {
    signal && signal.removeEventListener("abort", onAbort);
  }
}

function parseBlock(block) {
  let id = null, event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // keep-alive comment
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "id") id = value;
    else if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  let parsed;
  try { parsed = JSON.parse(data.join("\n")); } catch { parsed = { raw: data.join("\n") }; }
  return { id, event, data: parsed };
}
