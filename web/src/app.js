// The dispatcher's voice page: start a session, talk to its bot over SmallWebRTC, end it.
//
// Flow: POST /start {"transport": "webrtc"} answers {sessionId, iceConfig}; client.connect()
// then posts the SDP offer to /sessions/{sessionId}/api/offer (SmallWebRTCTransport derives it
// from the "/start" endpoint) and PATCHes ICE candidates there; the dispatcher proxies both to
// the session's bot. Disconnect hangs up and then DELETEs the session, so it ends even if the
// bot misses the hang-up.
import { LogLevel, PipecatClient, logger } from "@pipecat-ai/client-js";
import { SmallWebRTCTransport } from "@pipecat-ai/small-webrtc-transport";
import { MicMediaManager } from "./media.js";

const POLL_INTERVAL_MS = 1000;
const START_TIMEOUT_MS = 30000;
const TERMINAL_STATES = new Set(["ended", "failed"]);

const $ = (id) => document.getElementById(id);
const ui = {
  connect: $("connect"),
  disconnect: $("disconnect"),
  mic: $("mic"),
  sessionId: $("session-id"),
  sessionState: $("session-state"),
  transportState: $("transport-state"),
  error: $("error"),
  audio: $("bot-audio"),
  log: $("log"),
};

// Options from the URL fragment (never sent to the server): #token=<JWT> for a dispatcher with
// client auth, #debug for the client library's debug log.
const fragment = new URLSearchParams(location.hash.slice(1));
const token = fragment.get("token");
const authHeaders = token ? { Authorization: `Bearer ${token}` } : {};
logger.setLevel(fragment.has("debug") ? LogLevel.DEBUG : LogLevel.WARN);

// --- what happened, for people (the log list) and for tests (window.pipecatEvents) ---

const events = [];
window.pipecatEvents = events;

function record(name, detail) {
  events.push({ name, detail: detail ?? null, at: Date.now() });
  document.body.dataset.events = events.map((e) => e.name).join(" ");
  const item = document.createElement("li");
  const time = new Date().toLocaleTimeString();
  item.textContent = detail ? `${time} ${name}: ${detail}` : `${time} ${name}`;
  ui.log.prepend(item);
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
  record("error", message);
}

function clearError() {
  ui.error.textContent = "";
  ui.error.hidden = true;
}

// An error as a sentence: the dispatcher's JSON `detail` when there is one.
async function describe(err) {
  const response = err instanceof Response ? err : err?.cause;
  if (response instanceof Response) {
    let detail;
    try {
      const body = await response.clone().json();
      detail = body.detail ?? body.info;
    } catch {
      // not JSON: fall back to the status line
    }
    const what = detail ?? (response.statusText || "request failed");
    return `${what} (HTTP ${response.status})`;
  }
  if (err?.data?.message) return err.data.message; // an RTVI error message
  if (err?.message) return err.status ? `${err.message} (HTTP ${err.status})` : err.message;
  return String(err ?? "unknown error");
}

// --- the session, as the dispatcher sees it ---

let sessionId = null;
let pollTimer = null;

async function api(method, path) {
  const response = await fetch(path, { method, headers: authHeaders });
  if (!response.ok) throw response;
  return response.json();
}

function showSession(session) {
  const state = session.state ?? "unknown";
  const reason = session.endReason ?? session.end_reason ?? null;
  ui.sessionState.textContent = reason ? `${state} (${reason})` : state;
  ui.sessionState.dataset.state = state;
  if (reason) ui.sessionState.dataset.endReason = reason;
  if (TERMINAL_STATES.has(state)) stopPolling();
}

async function pollSession() {
  const id = sessionId;
  if (!id) return;
  try {
    const session = await api("GET", `/sessions/${encodeURIComponent(id)}`);
    if (id === sessionId) showSession(session);
  } catch (err) {
    if (id !== sessionId) return;
    stopPolling();
    showError(`Session ${id}: ${await describe(err)}`);
  }
}

function startPolling() {
  stopPolling();
  pollTimer = setInterval(pollSession, POLL_INTERVAL_MS);
  pollSession();
}

function stopPolling() {
  if (pollTimer !== null) clearInterval(pollTimer);
  pollTimer = null;
}

async function endSession(id, { keepalive = false } = {}) {
  const response = await fetch(`/sessions/${encodeURIComponent(id)}`, {
    method: "DELETE",
    headers: authHeaders,
    keepalive,
  });
  if (!response.ok && response.status !== 409) throw response; // 409: it had ended already
  record("session-delete-sent", id);
}

// --- the Pipecat client ---

const client = new PipecatClient({
  transport: new SmallWebRTCTransport({ mediaManager: new MicMediaManager() }),
  enableMic: true,
  enableCam: false,
  callbacks: {
    onTransportStateChanged: (state) => {
      ui.transportState.textContent = state;
      ui.transportState.dataset.state = state;
      record(`transport-${state}`);
      updateButtons();
    },
    onConnected: () => record("connected"),
    onDisconnected: () => record("disconnected"),
    onBotConnected: () => record("bot-connected"),
    onBotReady: () => record("bot-ready"),
    onBotDisconnected: () => record("bot-disconnected"),
    onTrackStarted: (track, participant) => {
      if (participant?.local) {
        record("local-track-started", track.kind);
        return;
      }
      if (track.kind !== "audio") return;
      ui.audio.srcObject = new MediaStream([track]);
      record("bot-track-started", track.kind);
      ui.audio.play().catch((err) => showError(`Cannot play the bot's audio: ${err.message}`));
    },
    onTrackStopped: (track, participant) => {
      if (!participant?.local && track.kind === "audio") record("bot-track-stopped");
    },
    onDeviceError: (err) => showError(err.message),
    onError: async (message) => {
      // A refused start arrives here too ("error-response"); connect() shows it, with its status.
      if (message?.type !== "error-response") showError(await describe(message));
    },
  },
});

ui.audio.addEventListener("playing", () => record("bot-audio-playing"));

let busy = false;

function updateButtons() {
  const state = client.state;
  const live = !["disconnected", "error"].includes(state);
  ui.connect.disabled = busy || live;
  ui.disconnect.disabled = !live && !busy;
  ui.mic.disabled = !["connected", "ready"].includes(state);
  const on = client.isMicEnabled;
  ui.mic.textContent = on ? "Mic on" : "Mic off";
  ui.mic.setAttribute("aria-pressed", String(on));
}

async function connect() {
  if (busy) return;
  busy = true;
  clearError();
  updateButtons();
  sessionId = null;
  ui.sessionId.textContent = "–";
  ui.sessionState.textContent = "–";
  delete ui.sessionState.dataset.state;
  delete ui.sessionState.dataset.endReason;
  let id = null;
  try {
    const answer = await client.startBot({
      endpoint: "/start",
      headers: new Headers(authHeaders),
      requestData: { transport: "webrtc" },
      timeout: START_TIMEOUT_MS,
    });
    id = answer.sessionId;
    sessionId = id;
    ui.sessionId.textContent = id;
    record("session-started", id);
    startPolling();
    await client.connect(answer);
  } catch (err) {
    showError(await describe(err));
    if (id) {
      // Do not leave a bot waiting for a peer that is not coming.
      await client.disconnect().catch(() => {});
      await endSession(id).catch(async (e) => showError(`Ending ${id}: ${await describe(e)}`));
    }
  } finally {
    busy = false;
    updateButtons();
  }
}

async function disconnect() {
  const id = sessionId;
  ui.disconnect.disabled = true;
  try {
    await client.disconnect();
  } catch (err) {
    showError(`Hang-up: ${await describe(err)}`);
  }
  ui.audio.srcObject = null;
  if (id) {
    try {
      await endSession(id);
    } catch (err) {
      showError(`Ending ${id}: ${await describe(err)}`);
    }
    if (pollTimer === null && id === sessionId) startPolling(); // follow it to its end
  }
  updateButtons();
}

function toggleMic() {
  client.enableMic(!client.isMicEnabled);
  record(client.isMicEnabled ? "mic-on" : "mic-off");
  updateButtons();
}

ui.connect.addEventListener("click", connect);
ui.disconnect.addEventListener("click", disconnect);
ui.mic.addEventListener("click", toggleMic);

// Closing the tab ends a live session too.
window.addEventListener("pagehide", () => {
  const state = ui.sessionState.dataset.state;
  if (sessionId && !TERMINAL_STATES.has(state)) {
    endSession(sessionId, { keepalive: true }).catch(() => {});
  }
});

updateButtons();
record("page-loaded");
