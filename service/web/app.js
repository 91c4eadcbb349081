// The page: pick media, draw regions on any frame, ask, watch the stages and the answer stream,
// then turn the scene the model saw. Talks only to the public API (api.js).
import { Api, ApiError } from "./api.js";
import { Stage, maskPNG } from "./draw.js";
import { openMedia } from "./frames.js";
import { renderMeasurements, sceneOverlay } from "./measure.js";
import { Viewer, parseScene } from "./viewer.js";

const PALETTE = ["#ff5d73", "#4fc3ff", "#ffd166", "#7ee081", "#c792ff", "#ff9f43", "#2de2c8", "#ff7ad9",
  "#a3e635", "#60a5fa", "#f472b6", "#fbbf24", "#34d399", "#f87171", "#818cf8", "#e879f9"];
const STAGES = ["queued", "decode", "pointmaps", "measure", "encode", "generate"];
const $ = (id) => document.getElementById(id);

const state = {
  media: null,
  regions: [], // [{color, label, anns: [{frame, kind, box|points}]}]
  selected: -1,
  job: null, // {id, controller}
  thumbs: new Map(), // frame index -> thumb element
  scene: null, // the last job's parsed scene (3D view)
  measurements: null, // the last job's `measurements` (done event)
};

const api = new Api(askForKey);
const stage = new Stage($("stage"), addShape);
let viewer = null;

// ---- API key ----------------------------------------------------------------------------------
let keyAsked = null; // the open dialog's promise: one dialog at a time, however many requests wait

/** Ask for a key (resolves with it, or null when dismissed). `rejected`: the key just sent was
 * refused, and the dialog says so instead of silently asking again. */
function askForKey(rejected = false) {
  const dlg = $("key-dialog");
  if (keyAsked) return keyAsked;
  $("key-error").hidden = !rejected;
  $("key-input").value = "";
  dlg.returnValue = ""; // Escape keeps the last returnValue: clear it so a dismissal is not an "ok"
  dlg.showModal();
  keyAsked = new Promise((resolve) => {
    dlg.addEventListener("close", () => {
      keyAsked = null;
      const key = dlg.returnValue === "ok" ? $("key-input").value.trim() : "";
      if (key) api.key = key;
      resolve(key || null);
    }, { once: true });
  });
  return keyAsked;
}

/** On load: when the server wants a key, ask until it accepts one (or the person dismisses the dialog). */
async function checkKeys() {
  try {
    let access = await api.access();
    if (access === "ok") return;
    $("key-button").hidden = false;
    while (access !== "ok") {
      if (access === "rejected") api.key = ""; // a refused key is not kept for the next request
      if (!await askForKey(access === "rejected")) return;
      access = await api.access();
    }
  } catch { /* server unreachable: the first request will say so */ }
}
$("key-button").addEventListener("click", () => askForKey(false));

// ---- media ------------------------------------------------------------------------------------
async function loadFile(file) {
  if (!file) return;
  const wrap = $("drop");
  try {
    const media = await openMedia(file);
    if (state.media) state.media.close();
    state.media = media;
    wanted = null;
    clearNotice("media");
    state.regions = [];
    state.selected = -1;
    wrap.classList.remove("empty");
    stage.setSource(media.source, media.width, media.height);
    $("scrubber").max = String(media.count - 1);
    $("scrubber").value = "0";
    $("scrub").hidden = media.kind !== "video";
    $("strip").hidden = media.kind !== "video";
    await showFrame(0);
    renderRegions();
    buildStrip();
    $("banner").hidden = !(media.kind === "video" && !media.exact);
    if (!$("banner").hidden) $("banner").textContent = "frame rate unknown to this browser: frame numbers assume 30 fps";
  } catch (e) {
    note(e.message, true);
  }
}

async function showFrame(k) {
  const m = state.media;
  if (!m) return;
  const index = await m.seek(k);
  $("scrubber").value = String(index);
  $("frame-label").textContent = m.kind === "video"
    ? `frame ${index} / ${m.count - 1} · ${(index / m.fps).toFixed(2)} s · ${m.fps.toFixed(2)} fps`
    : `${m.width}×${m.height}`;
  $("frame-badge").hidden = m.kind !== "video";
  $("frame-badge").textContent = `frame ${index}`;
  for (const [f, el] of state.thumbs) el.classList.toggle("current", f === index);
  drawStage();
}

async function buildStrip() {
  const strip = $("strip"), m = state.media;
  strip.replaceChildren();
  state.thumbs.clear();
  if (m.kind !== "video") return;
  const n = Math.min(m.count, Math.max(8, Math.floor(strip.clientWidth / 100)));
  await m.thumbs(n, 54, (k, canvas) => {
    if (state.media !== m) return;
    const b = document.createElement("button");
    b.className = "thumb";
    b.title = `frame ${k}`;
    b.dataset.frame = String(k);
    b.append(canvas, Object.assign(document.createElement("span"), { className: "num", textContent: k }),
      Object.assign(document.createElement("span"), { className: "dots" }));
    b.addEventListener("click", () => goTo(k));
    strip.append(b);
    state.thumbs.set(k, b);
    b.classList.toggle("current", k === m.index);
    markStrip();
  });
}

function markStrip() {
  for (const [f, el] of state.thumbs) {
    const dots = el.querySelector(".dots");
    dots.replaceChildren(...state.regions.filter((r) => r.anns.some((a) => a.frame === f))
      .map((r) => swatch("i", r.color)));
  }
}

// Frame navigation. Every move goes through goTo: one seek at a time, and while one runs only the
// latest wanted frame is sought next (coalesced). A step (◀ ▶, arrow keys) counts from the frame last
// asked for, not from the one still on screen, so five quick presses move exactly five frames.
let seeking = false, wanted = null, target = 0;

function goTo(k) {
  const m = state.media;
  if (!m) return;
  target = wanted = Math.max(0, Math.min(m.count - 1, k));
  if (seeking) return; // the running loop picks it up
  seeking = true;
  $("drop").dataset.seeking = "1"; // for tests and styles: a seek is in flight
  (async () => {
    try {
      while (wanted !== null) { const f = wanted; wanted = null; await showFrame(f); }
    } finally {
      seeking = false;
      delete $("drop").dataset.seeking;
    }
  })();
}

function step(d) {
  if (state.media) goTo((seeking ? target : state.media.index) + d);
}

$("scrubber").addEventListener("input", (e) => goTo(Number(e.target.value)));
$("prev").addEventListener("click", () => step(-1));
$("next").addEventListener("click", () => step(1));
$("file").addEventListener("change", (e) => loadFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("dragover"); });
drop.addEventListener("dragleave", () => drop.classList.remove("dragover"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("dragover"); loadFile(e.dataTransfer.files[0]); });
document.addEventListener("keydown", (e) => {
  if (e.target.closest("textarea, input")) return;
  if (e.key === "ArrowLeft" && state.media) step(-1);
  else if (e.key === "ArrowRight" && state.media) step(1);
  else if (e.key === "b") setTool("box");
  else if (e.key === "f") setTool("lasso");
});

// ---- regions ----------------------------------------------------------------------------------
function setTool(tool) {
  stage.tool = tool;
  for (const b of document.querySelectorAll(".tool")) b.classList.toggle("active", b.dataset.tool === tool);
}
for (const b of document.querySelectorAll(".tool")) b.addEventListener("click", () => setTool(b.dataset.tool));

function addShape(shape, { add }) {
  const ann = { frame: state.media.index, ...shape };
  if (add && state.regions[state.selected]) {
    const r = state.regions[state.selected];
    r.anns = r.anns.filter((a) => a.frame !== ann.frame).concat(ann); // one annotation per frame
  } else {
    const k = state.regions.length;
    const used = new Set(state.regions.map((r) => r.color));
    state.regions.push({ color: PALETTE.find((c) => !used.has(c)) || PALETTE[k % PALETTE.length], label: `object ${k}`, anns: [ann] });
    state.selected = k;
  }
  renderRegions();
}

function renderRegions() {
  const box = $("regions");
  if (!state.regions.length) {
    box.innerHTML = '<p class="muted">No regions yet. Draw a box or a freehand shape on the frame.</p>';
  } else {
    box.replaceChildren(...state.regions.map((r, k) => {
      const row = document.createElement("div");
      row.className = "region" + (k === state.selected ? " selected" : "");
      row.dataset.region = String(k);
      row.title = `Click to insert <region${k}> into the question`;
      const frames = r.anns.map((a) => `${a.kind === "box" ? "▭" : "✎"} ${state.media.kind === "video" ? "f" + a.frame : "image"}`).join(", ");
      row.innerHTML = `<span class="swatch"></span><span class="tag">&lt;region${k}&gt;</span>`
        + `<input aria-label="label" value=""><span class="where"></span><button title="Delete region">✕</button>`;
      row.querySelector(".swatch").style.background = r.color;
      row.querySelector(".where").textContent = frames;
      const input = row.querySelector("input");
      input.value = r.label;
      // The label is as wide as its text, so the rest of the row is free to click (insert).
      const fit = () => { input.size = Math.max(4, input.value.length + 1); };
      fit();
      input.addEventListener("click", (e) => e.stopPropagation());
      input.addEventListener("input", () => { r.label = input.value; fit(); drawStage(); });
      row.querySelector("button").addEventListener("click", (e) => { e.stopPropagation(); deleteRegion(k); });
      row.addEventListener("click", () => {
        state.selected = k;
        insertRef(k);
        const f = r.anns.find((a) => a.frame === state.media.index) ? state.media.index : r.anns[0].frame;
        renderRegions();
        if (f !== state.media.index) goTo(f);
      });
      return row;
    }));
  }
  markStrip();
  drawStage();
  updateAsk();
}

/** A colour chip; colours go through the CSSOM (the page's CSP forbids inline style attributes). */
function swatch(tag, color) {
  const el = document.createElement(tag);
  el.style.background = color;
  return el;
}

function deleteRegion(k) {
  state.regions.splice(k, 1);
  state.selected = Math.min(state.selected, state.regions.length - 1);
  // Keep the question's references pointing at the same regions.
  const q = $("question");
  q.value = q.value.replace(/<region(\d+)>/g, (m, d) => { const j = Number(d); return j === k ? "" : j > k ? `<region${j - 1}>` : m; });
  renderRegions();
}

function insertRef(k) {
  const q = $("question"), tag = `<region${k}>`;
  const s = q.selectionStart ?? q.value.length, e = q.selectionEnd ?? s;
  const before = q.value.slice(0, s), after = q.value.slice(e);
  const pad = before && !/\s$/.test(before) ? " " : "";
  q.value = before + pad + tag + after;
  const pos = (before + pad + tag).length;
  q.focus();
  q.setSelectionRange(pos, pos);
  updateAsk();
}

function drawStage() {
  const f = state.media ? state.media.index : -1;
  stage.shapes = [];
  state.regions.forEach((r, k) => {
    for (const a of r.anns) if (a.frame === f) stage.shapes.push({ ann: a, color: r.color, label: `${k} · ${r.label}`, selected: k === state.selected });
  });
  stage.render();
}

// ---- ask --------------------------------------------------------------------------------------
$("question").addEventListener("input", () => { clearNotice("question"); updateAsk(); });
function updateAsk() {
  $("ask").disabled = !state.media || !$("question").value.trim() || !!state.job;
}

async function buildForm() {
  const m = state.media, form = new FormData();
  form.append(m.kind, m.file, m.file.name);
  form.append("question", $("question").value.trim());
  let maskNo = 0;
  const regions = [];
  for (const r of state.regions) {
    const items = [];
    for (const a of r.anns) {
      if (a.kind === "box") items.push({ frame: a.frame, box: a.box });
      else {
        const name = `m${maskNo++}`;
        form.append(name, await maskPNG(a.points, m.width, m.height), `${name}.png`);
        items.push({ frame: a.frame, mask: name });
      }
    }
    regions.push(items.length === 1 ? items[0] : items);
  }
  form.append("regions", JSON.stringify(regions));
  const options = { max_tokens: Number($("opt-max-tokens").value) || 128, temperature: Number($("opt-temperature").value) || 0 };
  if ($("opt-frames").value) options.num_frames = Number($("opt-frames").value);
  if ($("opt-answer-mode").value) options.answer_mode = $("opt-answer-mode").value; // unset: the server's default
  form.append("options", JSON.stringify(options));
  const scene = $("opt-scene").files[0];
  if (scene) form.append("scene", scene, scene.name);
  return form;
}

function setStage(name, cls, info) {
  const li = document.querySelector(`#stages li[data-stage="${name}"]`);
  if (!li) return;
  const idx = STAGES.indexOf(name);
  for (const [i, s] of STAGES.entries()) {
    const el = document.querySelector(`#stages li[data-stage="${s}"]`);
    if (i < idx && cls !== "failed") { el.classList.remove("active"); el.classList.add("done"); }
  }
  li.classList.remove("active", "done", "failed");
  li.classList.add(cls);
  if (info !== undefined) {
    let t = li.querySelector(".t");
    if (!t) { t = document.createElement("span"); t.className = "t"; li.append(t); }
    t.textContent = info;
  }
}

function resetStages() {
  for (const li of document.querySelectorAll("#stages li")) { li.className = ""; li.querySelector(".t")?.remove(); }
}

const secs = (d) => (typeof d.seconds === "number" ? `${d.seconds.toFixed(2)} s` : "");

function onEvent(ev) {
  const out = $("answer"), d = ev.data;
  if (ev.event === "queued") setStage("queued", "active", d.position !== undefined ? `#${d.position + 1} in line` : "");
  else if (ev.event === "progress") {
    if (d.stage === "started") { setStage("queued", "done"); setStage("decode", "active"); }
    else if (d.stage === "decode") { setStage("decode", "done", secs(d)); setStage("pointmaps", "active"); }
    else if (d.stage === "pointmaps") {
      setStage("pointmaps", "done", secs(d));
      setStage("measure", "active");
      if (d.scene) loadScene();
    }
    else if (d.stage === "measure") { setStage("measure", "done", secs(d)); setStage("encode", "active"); }
    else if (d.stage === "encode") { setStage("encode", "done", secs(d)); setStage("generate", "active"); }
    else if (d.stage === "restream" && d.discard) out.textContent = "";
  } else if (ev.event === "token") {
    setStage("generate", "active");
    out.textContent += d.text || "";
    out.dataset.tokens = String(Number(out.dataset.tokens || 0) + 1);
    out.scrollTop = out.scrollHeight;
  } else if (ev.event === "done") {
    setStage("generate", "done", d.timings && d.timings.generate_s !== undefined ? `${d.timings.generate_s.toFixed(2)} s` : "");
    out.textContent = d.answer; // authoritative
    const u = d.usage || {};
    $("answer-meta").textContent = `${u.completion_tokens ?? "?"} tokens · ${u.prompt_tokens ?? "?"} prompt tokens · finish: ${d.finish_reason}`
      + (d.timings && d.timings.total_s !== undefined ? ` · ${d.timings.total_s.toFixed(2)} s in all` : "")
      + (d.answer_mode ? ` · answer from: ${d.answer_mode}` : "");
    if (d.answer_mode === "measured") { // the text was written from the measurements: no model ran
      setStage("encode", "skipped", "no model");
      setStage("generate", "skipped", "from measurements");
    }
    $("demo-note").hidden = !d.demo_model;
    state.measurements = d.measurements || null;
    renderMeasurements($("measurements"), state.measurements, state.regions);
    showOverlay();
    finishJob("done");
  } else if (ev.event === "error") {
    const active = document.querySelector("#stages li.active");
    if (active) setStage(active.dataset.stage, "failed");
    if (d.answer) out.textContent = d.answer;
    const err = document.createElement("span");
    err.className = "err";
    err.textContent = d.code === "cancelled" ? "Cancelled." : `${d.code}: ${d.message}`;
    out.append(err);
    out.classList.add("error");
    finishJob(d.code === "cancelled" ? "cancelled" : "failed");
  }
}

function finishJob(status) {
  const out = $("answer");
  out.classList.remove("streaming");
  out.dataset.status = status;
  $("cancel").hidden = true;
  state.job = null;
  updateAsk();
}

/** Say in the answer box why nothing was asked; `why` ("media", "question") says what clears it. */
function showNotice(why, text) {
  const out = $("answer");
  out.className = "answer-text notice";
  out.textContent = text;
  out.dataset.notice = why;
  delete out.dataset.status;
  $("answer-meta").textContent = "";
  resetStages();
}

function clearNotice(why) {
  const out = $("answer");
  if (out.dataset.notice !== why) return;
  out.className = "answer-text";
  out.textContent = "";
  delete out.dataset.notice;
}

async function ask() {
  if (state.job) return;
  // Ctrl+Enter reaches here even while the Ask button is disabled: say what is missing.
  if (!state.media) { showNotice("media", "Choose a video or image first."); return; }
  if (!$("question").value.trim()) { showNotice("question", "Write a question first."); return; }
  const out = $("answer");
  delete out.dataset.notice;
  out.textContent = "";
  out.className = "answer-text streaming";
  delete out.dataset.status;
  out.dataset.tokens = "0";
  delete out.dataset.jobId;
  $("answer-meta").textContent = "";
  $("demo-note").hidden = true;
  state.measurements = null;
  state.scene = null;
  renderMeasurements($("measurements"), null, []);
  if (viewer) viewer.clearOverlay();
  $("view-measure-toggle").hidden = true;
  resetStages();
  note("");
  const controller = new AbortController();
  state.job = { id: null, controller };
  updateAsk();
  try {
    const form = await buildForm();
    setStage("queued", "active");
    await api.ask(form, {
      onJob: (id) => { state.job && (state.job.id = id); out.dataset.jobId = id; $("cancel").hidden = false; },
      onEvent,
      onReconnect: (n) => note(`connection dropped, resuming (attempt ${n})…`),
    }, controller.signal);
    note("");
  } catch (e) {
    if (e.name === "AbortError") return;
    out.classList.remove("streaming");
    out.classList.add("error");
    out.textContent = e instanceof ApiError ? `${e.code}: ${e.message}` : String(e.message || e);
    resetStages();
    state.job = null;
    $("cancel").hidden = true;
    updateAsk();
  }
}
$("ask").addEventListener("click", ask);
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask(); });

$("cancel").addEventListener("click", async () => {
  const job = state.job;
  if (!job || !job.id) return;
  try { await api.cancel(job.id); } catch (e) { note(e.message, true); } // the stream's `error` event ends it
});

function note(text, bad = false) {
  const n = $("ask-note");
  n.textContent = text;
  n.style.color = bad ? "var(--bad)" : "";
}

// ---- 3D view ----------------------------------------------------------------------------------
async function loadScene() {
  const id = $("answer").dataset.jobId;
  if (!id) return;
  try {
    const scene = parseScene(await api.scene(id));
    if (!viewer) viewer = new Viewer($("view3d"), $("view-labels"));
    if ($("answer").dataset.jobId !== id) return; // another job started while this one's scene loaded
    viewer.setScene(scene, state.regions.map((r) => r.color));
    state.scene = scene;
    showOverlay();
    $("view-empty").hidden = true;
    $("view-help").hidden = false;
    const legend = $("legend");
    legend.replaceChildren(...state.regions.slice(0, scene.r).map((r, k) => {
      const s = document.createElement("span");
      s.append(swatch("i", r.color), `region${k} · ${r.label}`);
      return s;
    }), Object.assign(document.createElement("span"), {
      textContent: `${scene.n.toLocaleString()} points · ${scene.f} ${scene.f === 1 ? "camera" : "cameras"}${scene.metric ? ` · 1 unit = ${scene.scale.toFixed(2)} m` : ""}`,
    }));
    $("view3d").dataset.points = String(scene.n);
  } catch (e) {
    $("view-empty").hidden = false;
    $("view-empty").textContent = `3D view unavailable: ${e.message}`;
  }
}

/** The measured boxes and distances in the 3D view, once both the scene and the measurements are here
 * (the scene comes at the `pointmaps` event, the measurements with `done`: either may be first). */
function showOverlay() {
  if (!viewer || !state.scene || !state.measurements) return;
  const overlay = sceneOverlay(state.measurements, state.scene, state.regions.map((r) => r.color));
  viewer.setOverlay(overlay);
  viewer.setOverlayVisible($("view-measure").checked);
  $("view-measure-toggle").hidden = !(overlay.boxes.length || overlay.segments.length);
  if (overlay.skipped) $("measurements").append(Object.assign(document.createElement("p"), { className: "muted small", textContent: overlay.skipped }));
}
$("view-measure").addEventListener("change", (e) => viewer && viewer.setOverlayVisible(e.target.checked));

checkKeys();
