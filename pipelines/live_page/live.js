// The live page: server-sent events from /events (new samples and the status), drawn on canvases.
"use strict";
const WINDOW_S = 10;
const samples = [];  // [t, bvp or null, face]: the last WINDOW_S seconds
let status = {}, hrUpdates = 0, lastHr = null;
const $ = (id) => document.getElementById(id);
const fmt = (v, d) => (v === null || v === undefined || Number.isNaN(v)) ? "--" : v.toFixed(d);

function drawWave() {
  const c = $("wave"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  if (!samples.length) return;
  const tEnd = samples[samples.length - 1][0], vals = samples.filter(s => s[1] !== null).map(s => s[1]);
  if (!vals.length) { c.dataset.drawn = 0; return; }
  const lo = Math.min(...vals), hi = Math.max(...vals), span = (hi - lo) || 1;
  g.strokeStyle = "#4fd1c5"; g.lineWidth = 2; g.beginPath();
  let pen = false, drawn = 0;
  for (const [t, v] of samples) {
    if (v === null) { pen = false; continue; }  // no face: a gap, never a guess
    const x = (1 - (tEnd - t) / WINDOW_S) * c.width, y = c.height - 10 - (v - lo) / span * (c.height - 20);
    if (pen) g.lineTo(x, y); else g.moveTo(x, y);
    pen = true; drawn++;
  }
  g.stroke();
  c.dataset.drawn = drawn;
}

function drawBox() {
  const img = $("preview"), c = $("box"), g = c.getContext("2d");
  if (!img.naturalWidth || !status.frame_size) return;
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  g.clearRect(0, 0, c.width, c.height);
  if (!status.box) return;
  const s = c.width / status.frame_size[0], [y0, y1, x0, x1] = status.box;
  g.strokeStyle = "#ff5a6e"; g.lineWidth = 2; g.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
}

function show() {
  const hr = status.hr_bpm;
  if (hr !== null && hr !== undefined && hr !== lastHr) { hrUpdates++; lastHr = hr; }
  $("hr").textContent = fmt(hr, 1);
  $("hr").dataset.updates = hrUpdates;
  $("sqi").textContent = fmt(status.sqi, 2);
  $("face").textContent = status.face ? "yes" : "no face";
  $("face").className = status.face ? "" : "noface";
  $("time").textContent = fmt(status.t, 1) + " s";
  $("frames").textContent = status.frames ?? 0;
  $("dropped").textContent = status.dropped ?? 0;
  $("fps").textContent = fmt(status.fps, 1) + " fps";
  $("source").textContent = status.source ?? "";
  for (const k of ["decode", "face", "model", "total"]) $("lat-" + k).textContent = fmt(status.latency_ms?.[k], 2);
  drawWave(); drawBox();
}

const events = new EventSource("events");
events.onopen = () => { $("state").textContent = "live"; };
events.onmessage = (e) => {
  const msg = JSON.parse(e.data);
  for (const s of msg.samples) samples.push(s);
  if (samples.length) { const tEnd = samples[samples.length - 1][0]; while (samples[0][0] < tEnd - WINDOW_S) samples.shift(); }
  status = msg.status;
  show();
};
events.addEventListener("end", () => { $("state").textContent = "ended"; events.close(); });
events.onerror = () => { $("state").textContent = "disconnected"; };
setInterval(() => { if (status.t !== undefined) $("preview").src = "preview.jpg?" + Date.now(); }, 500);
$("preview").onload = drawBox;
