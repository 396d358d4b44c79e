// A microphone-only media manager for SmallWebRTCTransport, on plain getUserMedia.
//
// The transport's default (DailyMediaManager) drives devices through a daily-js call object,
// and daily-js loads its call machine from Daily's CDN at run time. This page must work offline
// from the dispatcher alone, so it brings its own manager; build.mjs stubs daily-js out of the
// bundle. Bot audio needs nothing here: it arrives as a WebRTC track (onTrackStarted).
//
// The microphone is "enabled" only when there is one: without a track (permission denied, no
// device) isMicEnabled is false whatever was asked, so the page and the bot (told through the
// transport's track status) both know the user cannot be heard.
import { DeviceError } from "@pipecat-ai/client-js";

const LOCAL = { id: "local", name: "", local: true };

function deviceErrorType(err) {
  switch (err?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "permissions";
    case "NotFoundError":
      return "not-found";
    case "NotReadableError":
    case "AbortError":
      return "in-use";
    case "OverconstrainedError":
      return "constraints";
    default:
      return "unknown";
  }
}

export class MicMediaManager {
  constructor() {
    this._callbacks = {};
    this._options = undefined;
    this._micWanted = true; // enableMic's initial value, for every new connection
    this._micEnabled = true;
    this._stream = null;
    this._selectedMic = {};
    this._initialized = false;
  }

  // --- the MediaManager interface SmallWebRTCTransport calls ---

  setUserAudioCallback(callback) {
    this._userAudioCallback = callback; // raw PCM is not needed with WebRTC
  }

  setClientOptions(options, override = false) {
    if (this._options && !override) return;
    this._options = options;
    this._callbacks = options.callbacks ?? {};
    this._micWanted = options.enableMic ?? true;
    this._micEnabled = this._micWanted;
  }

  get supportsScreenShare() {
    return false;
  }

  async initialize() {
    if (this._initialized) return;
    this._initialized = true;
    if (!navigator.mediaDevices?.getUserMedia) {
      this._reportError("undefined-mediadevices", "This browser gives no access to a microphone");
      return;
    }
    try {
      this._stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
    } catch (err) {
      // Without a microphone the bot can still be heard: carry on receive-only.
      this._reportError(deviceErrorType(err), `Microphone unavailable: ${err?.message ?? err}`, err);
      return;
    }
    const track = this._stream.getAudioTracks()[0];
    track.enabled = this._micEnabled;
    const mics = await this.getAllMics();
    this._callbacks.onAvailableMicsUpdated?.(mics);
    const deviceId = track.getSettings?.().deviceId;
    this._selectedMic = mics.find((d) => d.deviceId === deviceId) ?? {
      deviceId: deviceId ?? "default",
      label: track.label,
      kind: "audioinput",
    };
    this._callbacks.onMicUpdated?.(this._selectedMic);
  }

  async connect() {
    if (!this._initialized) await this.initialize();
    const track = this._track();
    if (track) this._callbacks.onTrackStarted?.(track, LOCAL);
  }

  async disconnect() {
    const track = this._track();
    this._stream?.getTracks().forEach((t) => t.stop());
    this._stream = null;
    this._initialized = false;
    this._micEnabled = this._micWanted;
    if (track) this._callbacks.onTrackStopped?.(track, LOCAL);
  }

  async userStartedSpeaking() {}

  bufferBotAudio() {
    return undefined;
  }

  async getAllMics() {
    const devices = (await navigator.mediaDevices?.enumerateDevices?.()) ?? [];
    return devices.filter((d) => d.kind === "audioinput");
  }

  async getAllCams() {
    return [];
  }

  async getAllSpeakers() {
    return [];
  }

  async updateMic() {
    console.warn("Choosing another microphone is not supported on this page");
  }

  updateCam() {}

  updateSpeaker() {}

  get selectedMic() {
    return this._selectedMic;
  }

  get selectedCam() {
    return {};
  }

  get selectedSpeaker() {
    return {};
  }

  enableMic(enable) {
    this._micEnabled = enable;
    const track = this._track();
    if (track) track.enabled = enable;
  }

  enableCam() {}

  enableScreenShare() {}

  get isMicEnabled() {
    return this._micEnabled && this.hasMic;
  }

  // Not in the MediaManager interface: whether a live microphone track exists.
  get hasMic() {
    return this._track()?.readyState === "live";
  }

  get isCamEnabled() {
    return false;
  }

  get isSharingScreen() {
    return false;
  }

  tracks() {
    const audio = this._track();
    return { local: audio ? { audio } : {} };
  }

  // --- helpers ---

  _track() {
    return this._stream?.getAudioTracks()[0] ?? null;
  }

  _reportError(type, message, sourceError) {
    const details = sourceError instanceof Error ? { sourceError } : undefined;
    this._callbacks.onDeviceError?.(new DeviceError(["mic"], type, message, details));
  }
}
