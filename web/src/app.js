// The dispatcher's voice page: start a session, talk to its bot over SmallWebRTC, end it.
//
// Flow: POST /start {"transport": "webrtc"} answers {sessionId, iceConfig}; client.connect()
// then posts the SDP offer to /sessions/{sessionId}/api/offer and PATCHes ICE candidates there;
// the dispatcher proxies both to the session's bot. The microphone is asked for at Connect but
// opens only when the bot says it is ready (RTVI bot-ready): nobody listens before, and words
// said then would be lost. Disconnect hangs up and then DELETEs the session, so it ends even if
// the bot misses the hang-up.
import { LogLevel, PipecatClient, logger } from "@pipecat-ai/client-js";
import { SmallWebRTCTransport } from "@pipecat-ai/small-webrtc-transport";
import {
  Dispatcher,
  DispatcherError,
  TERMINAL_STATES,
  answerError,
  forgetSession,
  liveRememberedSessions,
  rememberSession,
  unreachable,
} from "./dispatcher.js";
import { LevelMeter, audioContext } from "./levels.js";
import { MicMediaManager } from "./media.js";

const POLL_INTERVAL_MS = 1000;
const END_OTHERS_TIMEOUT_MS = 30000;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  statusHint: $("status-hint"),
  botInfo: $("bot-info"),
  connect: $("connect"),
  disconnect: $("disconnect"),
  mic: $("mic"),
  error: $("error"),
  capacity: $("capacity"),
  capacityText: $("capacity-text"),
  endOthers: $("end-others"),
  sessionId: $("session-id"),
  sessionState: $("session-state"),
  transportState: $("transport-state"),
  audio: $("bot-audio"),
  log: $("log"),
};

// Options from the URL fragment (never sent to the server): #token=<JWT> for a dispatcher with
// client auth, #debug for the client library's debug log.
const fragment = new URLSearchParams(location.hash.slice(1));
const token = fragment.get("token");
const dispatcher = new Dispatcher(token ? { Authorization: `Bearer ${token}` } : {});
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
  if (err instanceof DispatcherError) return err.message;
  const cause = err instanceof Response ? err : err?.cause;
  if (cause instanceof Response) return (await answerError(cause)).message;
  if (cause instanceof TypeError) return unreachable().message; // the offer got no answer
  if (err?.data?.message) return err.data.message; // an RTVI error message
  if (err?.message) return err.message;
  return String(err ?? "unknown error");
}

// --- what the page says: one phase at a time, in words ---
//
// idle → starting → connected → ending → ended, or failed; capacity (refused: the user has
// too many sessions) → ending-others → starting.

const view = {
  phase: "idle",
  endReason: null,
  endedHere: false, // this page asked for the end (Disconnect)
  micProblem: null, // why there is no microphone, in the browser's words
};

// End reasons (GET /sessions/{id}) in words; an unknown one is shown as it is.
const END_REASONS = {
  deleted: "the session was ended",
  participant_left: "you left",
  max_duration: "the session reached its time limit",
  idle_timeout: "nobody spoke for a while",
  ready_timeout: "the bot did not start in time",
  start_interrupted: "the dispatcher restarted while starting it",
  completed: "the bot finished",
  sigterm: "the bot was stopped",
  sigint: "the bot was stopped",
  room_left: "the bot left its room",
  dispatcher_stopped: "the dispatcher stopped",
  dispatcher_lost: "the dispatcher stopped, and its bot with it",
  entrypoint_error: "the bot's code cannot run",
  contract_error: "the bot was started wrongly",
  crashed: "the bot crashed",
  exited_before_ready: "the bot stopped before it was ready",
  oom_killed: "the bot ran out of memory",
  join_failed: "the bot could not join",
  error: "the bot failed",
};

function endWords() {
  // Disconnect sends the hang-up to the bot and then the DELETE: whichever the dispatcher
  // records first (the bot's own `participant_left` or `deleted`), this page hung up.
  const hungUp = view.endReason === "deleted" || view.endReason === "participant_left";
  if (hungUp && view.endedHere) return "you hung up";
  return END_REASONS[view.endReason] ?? view.endReason;
}

function sentence() {
  switch (view.phase) {
    case "starting":
      return ["Starting your bot…", "The microphone opens when the bot is ready."];
    case "connected":
      if (!mic.hasMic) {
        const why = view.micProblem ? ` (${view.micProblem})` : "";
        return [
          "Connected: listening only",
          `There is no microphone${why}, so the bot cannot hear you. ` +
            "Allow the microphone for this page, then connect again.",
        ];
      }
      return client.isMicEnabled
        ? ["Connected: talk", "The bot hears you."]
        : ["Connected: your microphone is off", "The bot cannot hear you."];
    case "ending":
      return ["Ending…", null];
    case "ended": {
      const why = endWords();
      return [why ? `Ended: ${why}.` : "Ended", "Press Connect to talk again."];
    }
    case "failed":
      return ["Could not connect", "Press Connect to try again."];
    case "capacity":
      return ["You have too many sessions running", null];
    case "ending-others":
      return ["Ending your other sessions…", "Then your bot starts."];
    default:
      return [
        "Press Connect to talk to a bot.",
        "Your browser asks for the microphone; it opens once the bot is ready.",
      ];
  }
}

function setPhase(phase) {
  if (view.phase !== phase) record(`phase-${phase}`);
  view.phase = phase;
  render();
}

function render() {
  const [text, hint] = sentence();
  ui.status.textContent = text;
  ui.status.dataset.phase = view.phase;
  ui.status.parentElement.dataset.phase = view.phase;
  ui.statusHint.textContent = hint ?? "";
  ui.statusHint.hidden = !hint;

  const { phase } = view;
  ui.connect.disabled = !["idle", "ended", "failed", "capacity"].includes(phase);
  ui.disconnect.disabled = !["starting", "connected"].includes(phase);
  // The mic button says what the microphone does: off until the bot is ready, and off (and
  // disabled) when there is no microphone at all.
  const on = phase === "connected" && client.isMicEnabled;
  const none = phase === "connected" && !mic.hasMic;
  ui.mic.disabled = phase !== "connected" || none;
  ui.mic.setAttribute("aria-pressed", String(on));
  ui.mic.dataset.mic = none ? "none" : on ? "on" : "off";
  ui.mic.textContent = none ? "No microphone" : on ? "Mic on" : "Mic off";
  if (["ended", "failed"].includes(phase)) hideBotInfo(); // it was about the bot that left
}

function fail(message) {
  showError(message);
  setPhase("failed");
}

// --- the session, as the dispatcher sees it ---

let sessionId = null;
let pollTimer = null;

function setSession(id) {
  sessionId = id;
  ui.sessionId.textContent = id ?? "–";
  ui.sessionState.textContent = "–";
  delete ui.sessionState.dataset.state;
  delete ui.sessionState.dataset.endReason;
}

function showSession(session) {
  const state = session.state ?? "unknown";
  const reason = session.endReason ?? session.end_reason ?? null;
  ui.sessionState.textContent = reason ? `${state} (${reason})` : state;
  ui.sessionState.dataset.state = state;
  if (reason) ui.sessionState.dataset.endReason = reason;
  if (!TERMINAL_STATES.has(state)) return;
  stopPolling();
  forgetSession(session.sessionId ?? sessionId);
  view.endReason = reason;
  if (["starting", "connected", "ending"].includes(view.phase)) {
    // Ended by the dispatcher or the bot (a limit, a crash): hang up too.
    connectAttempt += 1;
    client.disconnect().catch(() => {});
    if (state === "failed" && session.error) showError(`The bot failed: ${session.error}`);
    setPhase("ended");
  } else {
    render();
  }
}

async function pollSession() {
  const id = sessionId;
  if (!id) return;
  try {
    const session = await dispatcher.session(id);
    if (id === sessionId) showSession(session);
  } catch (err) {
    if (id !== sessionId) return;
    stopPolling();
    showError(`Session ${id}: ${err.message}`);
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

async function endSession(id, options) {
  await dispatcher.end(id, options);
  record("session-delete-sent", id);
}

// --- the Pipecat client ---

const mic = new MicMediaManager();
const userLevel = new LevelMeter($("user-speaker"), { onSpeaking: () => record("user-speaking") });
const botLevel = new LevelMeter($("bot-speaker"), { onSpeaking: () => record("bot-speaking") });

const client = new PipecatClient({
  transport: new SmallWebRTCTransport({ mediaManager: mic }),
  enableMic: false, // opened at bot-ready
  enableCam: false,
  callbacks: {
    onTransportStateChanged: (state) => {
      ui.transportState.textContent = state;
      ui.transportState.dataset.state = state;
      record(`transport-${state}`);
      if (["disconnected", "error"].includes(state) && view.phase === "connected") {
        setPhase("ending"); // the bot left, or the connection dropped: the poll says how it ended
      }
    },
    onConnected: () => record("connected"),
    onDisconnected: () => record("disconnected"),
    onBotConnected: () => record("bot-connected"),
    onBotReady: () => {
      record("bot-ready");
      openMic();
    },
    onBotDisconnected: () => record("bot-disconnected"),
    onServerMessage: (data) => {
      record("server-message", JSON.stringify(data));
      if (data?.type === "bot-info") showBotInfo(data);
    },
    onTrackStarted: (track, participant) => {
      if (track.kind !== "audio") return;
      if (participant?.local) {
        record("local-track-started", track.kind);
        userLevel.attach(track);
        return;
      }
      ui.audio.srcObject = new MediaStream([track]);
      botLevel.attach(track);
      record("bot-track-started", track.kind);
      ui.audio.play().catch((err) => showError(`Cannot play the bot's audio: ${err.message}`));
    },
    onTrackStopped: (track, participant) => {
      if (track.kind !== "audio") return;
      if (participant?.local) {
        userLevel.detach();
        return;
      }
      botLevel.detach();
      record("bot-track-stopped");
    },
    onDeviceError: (err) => {
      view.micProblem = err.message.replace(/^Microphone unavailable: /, "");
      record("mic-unavailable", err.message);
      render();
    },
    onError: async (message) => {
      // An "error-response" answers one of the client's requests, whose caller reports it.
      if (message?.type !== "error-response") showError(await describe(message));
    },
  },
});

ui.audio.addEventListener("playing", () => record("bot-audio-playing"));

function openMic() {
  if (view.phase !== "starting") return;
  if (mic.hasMic) {
    client.enableMic(true);
    record("mic-opened");
  }
  setPhase("connected");
}

// A bot may say what it is (a server message {"type": "bot-info", "mode": ...}); the page
// says nothing for a bot that does not.
const BOT_MODES = {
  echo: "This bot is an echo: it plays back what you say once you stop speaking.",
};

function showBotInfo(info) {
  const text = BOT_MODES[info.mode];
  if (!text) return;
  ui.botInfo.textContent = text;
  ui.botInfo.hidden = false;
  ui.botInfo.dataset.mode = info.mode;
}

function hideBotInfo() {
  ui.botInfo.hidden = true;
  ui.botInfo.textContent = "";
  delete ui.botInfo.dataset.mode;
}

// --- the buttons ---

// Each Connect is an attempt; Disconnect (or the session's end) makes the one in flight stale.
let connectAttempt = 0;

async function connect() {
  if (ui.connect.disabled && view.phase !== "ending-others") return;
  const attempt = ++connectAttempt;
  const current = () => attempt === connectAttempt;
  audioContext(); // made in the click, so that the level meters run
  clearError();
  hideCapacity();
  hideBotInfo();
  setSession(null);
  Object.assign(view, { endReason: null, endedHere: false, micProblem: null });
  setPhase("starting");
  // The browser asks for the microphone while the dispatcher starts the bot: a warm bot is
  // ready in well under a second, so neither waits for the other. A refusal is reported
  // through onDeviceError: the session goes on, listening only.
  const devices = client.initDevices().catch(() => {});
  let answer;
  try {
    answer = await dispatcher.start();
  } catch (err) {
    await devices;
    if (!current()) return;
    await mic.disconnect(); // no session: let the microphone go
    if (err.code === "user-at-capacity") await offerToEndOthers(err);
    else fail(err.message);
    return;
  }
  await devices;
  const id = answer.sessionId;
  rememberSession(id);
  if (!current()) {
    await endSession(id).catch(() => {});
    return;
  }
  setSession(id);
  record("session-started", id);
  startPolling();
  try {
    await client.connect({
      webrtcRequestParams: dispatcher.offerRequest(id),
      iceConfig: answer.iceConfig,
    });
  } catch (err) {
    if (!current()) return;
    const message = await describe(err);
    // Do not leave a bot waiting for a peer that is not coming.
    await client.disconnect().catch(() => {});
    await endSession(id).catch((e) => showError(`Ending the session: ${e.message}`));
    fail(message);
  }
}

async function disconnect() {
  const id = sessionId;
  connectAttempt += 1;
  view.endedHere = true;
  setPhase("ending");
  try {
    await client.disconnect();
  } catch (err) {
    showError(`Hang-up: ${await describe(err)}`);
  }
  ui.audio.srcObject = null;
  if (!id) {
    setPhase("ended");
    return;
  }
  try {
    await endSession(id);
  } catch (err) {
    showError(`Ending the session: ${err.message}`);
  }
  if (pollTimer === null && id === sessionId) startPolling(); // follow it to its end
}

function toggleMic() {
  client.enableMic(!client.isMicEnabled);
  record(client.isMicEnabled ? "mic-on" : "mic-off");
  render();
}

// --- at capacity: offer to end the sessions this browser started ---

let otherSessions = [];

async function offerToEndOthers(refusal) {
  let live;
  try {
    live = await liveRememberedSessions(dispatcher);
  } catch (err) {
    fail(`${refusal.message}; and the sessions this browser started: ${err.message}`);
    return;
  }
  otherSessions = live.map((s) => s.sessionId);
  const n = live.length;
  ui.capacityText.textContent =
    n === 0
      ? "You already have as many sessions running as you may, and none was started from " +
        "this browser: end one where it was started, or wait for one to end."
      : `You already have as many sessions running as you may. ${n === 1 ? "One" : n} of ` +
        `them ${n === 1 ? "was" : "were"} started from this browser and ` +
        `${n === 1 ? "is" : "are"} still running.`;
  ui.endOthers.textContent = n === 1 ? "End it and connect" : "End them and connect";
  ui.endOthers.hidden = n === 0;
  ui.capacity.hidden = false;
  record("capacity-offer", otherSessions.join(" "));
  setPhase("capacity");
}

function hideCapacity() {
  ui.capacity.hidden = true;
  otherSessions = [];
}

async function endOthersAndConnect() {
  const ids = otherSessions;
  hideCapacity();
  clearError();
  setPhase("ending-others");
  try {
    await Promise.all(ids.map((id) => endSession(id)));
    await untilEnded(ids);
  } catch (err) {
    fail(err.message);
    return;
  }
  record("other-sessions-ended", ids.join(" "));
  await connect();
}

// Until every session of `ids` has ended (a DELETEd session counts until its bot is gone).
async function untilEnded(ids) {
  const deadline = Date.now() + END_OTHERS_TIMEOUT_MS;
  let left = ids;
  while (left.length > 0) {
    if (Date.now() > deadline) throw new DispatcherError("Your other sessions did not end in time.");
    await new Promise((resolve) => setTimeout(resolve, POLL_INTERVAL_MS / 2));
    const live = await liveRememberedSessions(dispatcher);
    left = left.filter((id) => live.some((s) => s.sessionId === id));
  }
}

ui.connect.addEventListener("click", connect);
ui.disconnect.addEventListener("click", disconnect);
ui.mic.addEventListener("click", toggleMic);
ui.endOthers.addEventListener("click", endOthersAndConnect);

// Closing the tab ends a live session too.
window.addEventListener("pagehide", () => {
  const state = ui.sessionState.dataset.state;
  if (sessionId && !TERMINAL_STATES.has(state)) {
    endSession(sessionId, { keepalive: true }).catch(() => {});
  }
});

render();
record("page-loaded");
