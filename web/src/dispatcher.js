// The dispatcher's HTTP API as the page uses it, and the sessions this browser started.
//
// Every failure is a DispatcherError whose message is a sentence for a person: the JSON body's
// `detail` (or `error`) with the HTTP status, or "Cannot reach the dispatcher" when no answer
// came at all (fetch itself failed: the server is down, the network is gone).

const REQUEST_TIMEOUT_MS = 30000;
const UNREACHABLE = "Cannot reach the dispatcher: is it still running? Try again once it is.";
const STORAGE_KEY = "pipecat-dispatcher:sessions";
const REMEMBERED_MAX = 20;

export const TERMINAL_STATES = new Set(["ended", "failed"]);

/** A request that failed: `status` and `code` are null when no answer came. */
export class DispatcherError extends Error {
  constructor(message, { status = null, code = null } = {}) {
    super(message);
    this.name = "DispatcherError";
    this.status = status;
    this.code = code;
  }
}

export const unreachable = () => new DispatcherError(UNREACHABLE, { code: "unreachable" });

/** The error of a non-2xx answer, from its JSON body when it has one. */
export async function answerError(response) {
  let body = null;
  try {
    body = await response.clone().json();
  } catch {
    // not JSON: the status line says it
  }
  const detail = String(body?.detail ?? body?.error ?? body?.info ?? (response.statusText || "refused"));
  const sentence = detail.charAt(0).toUpperCase() + detail.slice(1);
  return new DispatcherError(`${sentence} (HTTP ${response.status})`, {
    status: response.status,
    code: typeof body?.code === "string" ? body.code : null,
  });
}

export class Dispatcher {
  /** `headers`: sent with every request (the bearer token, when the page has one). */
  constructor(headers = {}) {
    this.headers = headers;
  }

  /** POST /start for a webrtc session: `{sessionId, iceConfig}`. */
  start() {
    return this._request("POST", "/start", { transport: "webrtc" });
  }

  session(id) {
    return this._request("GET", sessionPath(id));
  }

  /** DELETE the session; one that had ended already (409) counts as ended. */
  async end(id, { keepalive = false } = {}) {
    try {
      await this._request("DELETE", sessionPath(id), undefined, { keepalive });
    } catch (err) {
      if (err.status !== 409) throw err;
    }
  }

  offerRequest(id) {
    return { endpoint: `${sessionPath(id)}/api/offer`, headers: new Headers(this.headers) };
  }

  async _request(method, path, body, { keepalive = false } = {}) {
    const headers = { ...this.headers };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const signal = keepalive ? undefined : AbortSignal.timeout(REQUEST_TIMEOUT_MS);
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        keepalive,
        signal,
      });
    } catch (err) {
      if (err?.name === "TimeoutError") {
        throw new DispatcherError(`The dispatcher did not answer within ${REQUEST_TIMEOUT_MS / 1000} s.`);
      }
      throw unreachable();
    }
    if (!response.ok) throw await answerError(response);
    return response.status === 204 ? null : response.json().catch(() => null);
  }
}

function sessionPath(id) {
  return `/sessions/${encodeURIComponent(id)}`;
}

// --- the sessions this browser started (localStorage): a user's own sessions can only be
// read by id, so these are the ones the page can offer to end when the user is at capacity ---

export function rememberedSessions() {
  try {
    const ids = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "[]");
    return Array.isArray(ids) ? ids.filter((id) => typeof id === "string") : [];
  } catch {
    return [];
  }
}

function store(ids) {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(ids.slice(-REMEMBERED_MAX)));
  } catch {
    // storage full or disabled: the page works without it
  }
}

export function rememberSession(id) {
  store([...rememberedSessions().filter((known) => known !== id), id]);
}

export function forgetSession(id) {
  store(rememberedSessions().filter((known) => known !== id));
}

/** The remembered sessions still live, as GET /sessions/{id} shows them; the others forgotten. */
export async function liveRememberedSessions(dispatcher) {
  const live = [];
  for (const id of rememberedSessions()) {
    try {
      const session = await dispatcher.session(id);
      if (TERMINAL_STATES.has(session.state)) forgetSession(id);
      else live.push(session);
    } catch (err) {
      if (err.status === 404) forgetSession(id); // gone, or another user's
      else throw err;
    }
  }
  return live;
}
