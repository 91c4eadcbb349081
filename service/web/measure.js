// The job's measurements (the `measurements` object of `done`; typed as `Measurements` in
// service/schemas.py): the panel under the answer, and the boxes and distance segments the 3D view
// draws. Every number is shown with its unit and a note of where its scale came from.

/** A length as text: metres with cm precision (mm below 1 m), or plain relative units. */
export function formatLength(len) {
  if (!len || typeof len.value !== "number") return "—";
  const v = len.value;
  if (len.unit === "m") return `${v.toFixed(Math.abs(v) < 1 ? 3 : 2)} m`;
  if (len.unit === "m^3") return `${v.toPrecision(3)} m³`;
  return `${v.toPrecision(3)} rel. units`;
}

/** Where the numbers come from, in words (`source` is the server's own short name). */
export function sourceNote(m) {
  if (m.scale === "metric") {
    if (m.source.startsWith("rgbd depth")) return `measured from RGB-D depth (metres; source: ${m.source})`;
    if (m.source.startsWith("scaled by")) return `metric through a scale hint (${m.source})`;
    return `metric, from ${m.source}`;
  }
  return `relative (${m.source}), no metric scale: only ratios and comparisons mean anything`;
}

const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

/** Fill `box` with the measurements; regions: [{color, label}] in region order (the page's own). */
export function renderMeasurements(box, m, regions) {
  box.replaceChildren();
  if (!m) { box.hidden = true; return; }
  box.hidden = false;
  box.dataset.scale = m.scale;
  const head = el("div", "m-head");
  head.append(el("strong", "", "Measurements"), " · ",
    el("span", "m-source", sourceNote(m)));
  const up = el("div", "m-up muted small",
    `up: ${m.up.method}${m.up.method === "horizontal plane" ? ` (${m.up.plane_inliers.toLocaleString()} plane points)` : ""} · ${m.frame}`);
  box.append(head, up);
  const name = (k) => `region${k}${regions[k] ? ` · ${regions[k].label}` : ""}`;
  const chip = (k) => {
    const i = el("i", "swatch");
    if (regions[k]) i.style.background = regions[k].color; // CSSOM: the CSP forbids style attributes
    return i;
  };

  const list = el("ul", "m-list");
  for (const r of m.regions) {
    const li = el("li", "m-region");
    li.dataset.region = String(r.region);
    li.append(chip(r.region), el("span", "m-name", name(r.region)));
    if (!r.available) {
      li.classList.add("unavailable");
      li.append(el("span", "m-val", `not measurable: ${r.reason || "no reason given"}`));
    } else {
      const size = el("span", "m-val m-size");
      const unit = r.width && r.width.unit === "m" ? " m" : " rel. units";
      const num = (len) => (len.unit === "m" ? len.value.toFixed(Math.abs(len.value) < 1 ? 3 : 2) : len.value.toPrecision(3));
      size.textContent = `${num(r.width)} × ${num(r.height)} × ${num(r.depth)}${unit} (w × h × d)`;
      size.dataset.width = String(r.width.value);
      size.dataset.height = String(r.height.value);
      size.dataset.depth = String(r.depth.value);
      li.append(size, el("span", "m-val", `longest ${formatLength(r.longest)}`),
        el("span", "muted small", `${r.points_used.toLocaleString()} of ${r.points_total.toLocaleString()} points, `
          + `${r.frames.length} ${r.frames.length === 1 ? "frame" : "frames"}`));
    }
    list.append(li);
  }
  for (const p of m.pairs) {
    const li = el("li", "m-pair");
    li.dataset.pair = `${p.a}-${p.b}`;
    li.append(chip(p.a), chip(p.b), el("span", "m-name", `region${p.a} ↔ region${p.b}`));
    if (!p.available) {
      li.classList.add("unavailable");
      li.append(el("span", "m-val", `not measurable: ${p.reason || "a region is not measurable"}`));
    } else {
      const centre = el("span", "m-val m-centre", `centres ${formatLength(p.center_distance)} apart`);
      centre.dataset.value = String(p.center_distance.value);
      li.append(centre,
        el("span", "m-val m-closest", `closest points ${formatLength(p.closest_distance)}`),
        el("span", "m-val", `horizontal ${formatLength(p.horizontal_distance)} · vertical ${formatLength(p.vertical_distance)}`));
      const d = p.direction || {};
      const words = [d.left_right, d.above_below, d.front_behind].filter(Boolean).join(", ");
      if (words || d.clock) {
        li.append(el("span", "m-val m-direction",
          `region${p.b} from region${p.a}: ${words}${d.clock ? ` · ${d.clock} o'clock` : ""}`));
      }
    }
    list.append(li);
  }
  box.append(list);
}

/**
 * Boxes and centre-to-centre segments in the scene's coordinates. The measurements' positions are the
 * point maps' (the job's world frame, the scene's frame too) times a factor: the point maps' metres
 * per unit when metric (the scene header's `scale`), 1 when relative. A scale hint rescales by a
 * factor the scene does not carry: then nothing is drawn and `skipped` says why.
 * Returns {boxes: [{region, color, corners: [8][3]}], segments: [{a, b, from, to, text, value}], skipped}.
 */
export function sceneOverlay(m, scene, colors) {
  const out = { boxes: [], segments: [], skipped: null };
  if (!m) return out;
  let k;
  if (m.scale === "relative") k = 1;
  else if (scene.metric && !m.source.startsWith("scaled by")) k = scene.scale;
  else {
    out.skipped = "boxes not drawn: a scale hint rescaled the measurements";
    return out;
  }
  const toScene = (v) => v.map((x) => x / k);
  const centres = new Map();
  for (const r of m.regions) {
    if (!r.available || !r.box) continue;
    const { center, size, axes } = r.box;
    const corners = [];
    for (const sx of [-0.5, 0.5]) for (const sy of [-0.5, 0.5]) for (const sz of [-0.5, 0.5]) {
      corners.push(toScene([0, 1, 2].map((i) => center[i] + sx * size[0] * axes[0][i] + sy * size[1] * axes[1][i]
        + sz * size[2] * axes[2][i])));
    }
    centres.set(r.region, toScene(center));
    out.boxes.push({ region: r.region, color: colors[r.region] || "#ffffff", corners });
  }
  for (const p of m.pairs) {
    if (!p.available || !p.center_distance || !centres.has(p.a) || !centres.has(p.b)) continue;
    out.segments.push({ a: p.a, b: p.b, from: centres.get(p.a), to: centres.get(p.b),
      text: formatLength(p.center_distance), value: p.center_distance.value });
  }
  return out;
}

/** The 12 edges of a box whose 8 corners are ordered by (x, y, z) sign bits: pairs differing in one bit. */
export const BOX_EDGES = [[0, 1], [2, 3], [4, 5], [6, 7], [0, 2], [1, 3], [4, 6], [5, 7], [0, 4], [1, 5], [2, 6], [3, 7]];
