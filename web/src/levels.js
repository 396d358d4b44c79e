// Who is speaking: a level meter on an audio track, measured with WebAudio.
//
// @pipecat-ai/client-js reports audio levels only through daily-js's media manager, which this
// page does not use (media.js), so the page measures the tracks themselves: the microphone's
// (silent while it is closed or muted, as the bot hears it) and the bot's.

const SAMPLE_MS = 50;
const FLOOR_DB = -60; // a level of 0; 0 dBFS is 1
const SPEAKING = 0.25; // above this (about -45 dBFS) someone is speaking
const HOLD_MS = 400; // ... and still is for this long after, so words do not flicker

let sharedContext = null;

/** The page's AudioContext, made (or resumed) on a click so that the browser lets it run. */
export function audioContext() {
  sharedContext ??= new AudioContext();
  if (sharedContext.state === "suspended") sharedContext.resume().catch(() => {});
  return sharedContext;
}

/** A track's level, 0 to 1 on a dB scale, from the RMS of its latest samples. */
function level(analyser, buffer) {
  analyser.getFloatTimeDomainData(buffer);
  let sum = 0;
  for (const sample of buffer) sum += sample * sample;
  const rms = Math.sqrt(sum / buffer.length);
  const db = rms > 0 ? 20 * Math.log10(rms) : -Infinity;
  return Math.min(1, Math.max(0, (db - FLOOR_DB) / -FLOOR_DB));
}

export class LevelMeter {
  /** `element`: the speaker's box (gets `data-speaking`), holding a `[role=meter]` bar. */
  constructor(element, { onSpeaking = () => {} } = {}) {
    this._element = element;
    this._meter = element.querySelector("[role=meter]");
    this._fill = element.querySelector(".meter-fill");
    this._onSpeaking = onSpeaking;
    this._source = null;
    this._timer = null;
    this._lastLoud = 0;
    this._speaking = false;
  }

  attach(track) {
    this.detach();
    const context = audioContext();
    this._source = context.createMediaStreamSource(new MediaStream([track]));
    const analyser = context.createAnalyser();
    analyser.fftSize = 1024;
    this._source.connect(analyser);
    const buffer = new Float32Array(analyser.fftSize);
    this._timer = setInterval(() => this._show(level(analyser, buffer)), SAMPLE_MS);
  }

  detach() {
    if (this._timer !== null) clearInterval(this._timer);
    this._timer = null;
    this._source?.disconnect();
    this._source = null;
    this._lastLoud = 0;
    this._show(0);
  }

  _show(value) {
    this._fill.style.transform = `scaleX(${value.toFixed(3)})`;
    this._meter.setAttribute("aria-valuenow", String(Math.round(value * 100)));
    const now = performance.now();
    if (value >= SPEAKING) this._lastLoud = now;
    const speaking = value >= SPEAKING || (this._speaking && now - this._lastLoud < HOLD_MS);
    if (speaking === this._speaking) return;
    this._speaking = speaking;
    this._element.dataset.speaking = String(speaking);
    if (speaking) this._onSpeaking();
  }
}
