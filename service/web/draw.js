// The frame canvas: shows the current frame with its regions, and turns drags into shapes.
// All coordinates are pixels of the displayed source frame (what the API expects): the canvas'
// backing store is the frame's own size and CSS scales it.

export class Stage {
  /** onShape({kind: "box", box: [x0,y0,x1,y1]} | {kind: "mask", points: [[x,y],...]}, {add: shiftKey}) */
  constructor(canvas, onShape) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.onShape = onShape;
    this.tool = "box";
    this.source = null;
    this.shapes = []; // [{ann, color, label, selected}]
    this.draft = null;
    this._bind();
    new ResizeObserver(() => { this.fit(); this.render(); }).observe(canvas.parentElement);
  }

  /** Largest CSS size with the frame's aspect that fits the (fixed-aspect) wrapper. */
  fit() {
    const p = this.canvas.parentElement, c = this.canvas;
    const s = Math.min(p.clientWidth / c.width, p.clientHeight / c.height);
    c.style.width = `${Math.floor(c.width * s)}px`;
    c.style.height = `${Math.floor(c.height * s)}px`;
  }

  setSource(source, width, height) {
    this.source = source;
    this.canvas.width = width;
    this.canvas.height = height;
    this.fit();
    this.render();
  }

  /** Pixel scale between CSS and the frame: keeps strokes and labels a constant on-screen size. */
  get k() { return this.canvas.width / Math.max(1, this.canvas.clientWidth); }

  _point(e) {
    const r = this.canvas.getBoundingClientRect();
    const x = (e.clientX - r.left) * this.canvas.width / r.width;
    const y = (e.clientY - r.top) * this.canvas.height / r.height;
    return [Math.max(0, Math.min(this.canvas.width, x)), Math.max(0, Math.min(this.canvas.height, y))];
  }

  _bind() {
    const c = this.canvas;
    c.addEventListener("pointerdown", (e) => {
      if (!this.source || e.button !== 0) return;
      c.setPointerCapture(e.pointerId);
      const p = this._point(e);
      this.draft = { kind: this.tool === "box" ? "box" : "mask", start: p, points: [p], add: e.shiftKey };
    });
    c.addEventListener("pointermove", (e) => {
      if (!this.draft) return;
      const p = this._point(e);
      const last = this.draft.points[this.draft.points.length - 1];
      if (this.draft.kind === "box") this.draft.points = [this.draft.start, p];
      else if (Math.hypot(p[0] - last[0], p[1] - last[1]) > 1.5 * this.k) this.draft.points.push(p);
      this.render();
    });
    const up = (e) => {
      const d = this.draft;
      this.draft = null;
      if (!d) return;
      if (d.kind === "box") {
        const [a, b] = [d.start, this._point(e)];
        const box = [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])].map((v) => Math.round(v));
        if (box[2] - box[0] >= 3 && box[3] - box[1] >= 3) this.onShape({ kind: "box", box }, { add: d.add });
      } else if (d.points.length >= 3 && polygonArea(d.points) > 9) {
        this.onShape({ kind: "mask", points: d.points.map(([x, y]) => [Math.round(x * 10) / 10, Math.round(y * 10) / 10]) }, { add: d.add });
      }
      this.render();
    };
    c.addEventListener("pointerup", up);
    c.addEventListener("pointercancel", () => { this.draft = null; this.render(); });
  }

  render() {
    const { ctx, canvas } = this;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!this.source) return;
    ctx.drawImage(this.source, 0, 0, canvas.width, canvas.height);
    const k = this.k;
    for (const s of this.shapes) drawShape(ctx, s.ann, s.color, s.label, k, s.selected);
    if (this.draft) {
      const d = this.draft;
      const ann = d.kind === "box"
        ? { kind: "box", box: [...d.points[0], ...(d.points[1] || d.points[0])].map((v, i, a) => i < 2 ? Math.min(v, a[i + 2]) : Math.max(v, a[i - 2])) }
        : { kind: "mask", points: d.points };
      drawShape(ctx, ann, "#ffffff", null, k, true, true);
    }
  }
}

function polygonArea(pts) {
  let a = 0;
  for (let i = 0; i < pts.length; i++) {
    const [x0, y0] = pts[i], [x1, y1] = pts[(i + 1) % pts.length];
    a += x0 * y1 - x1 * y0;
  }
  return Math.abs(a) / 2;
}

function tracePath(ctx, ann) {
  ctx.beginPath();
  if (ann.kind === "box") {
    const [x0, y0, x1, y1] = ann.box;
    ctx.rect(x0, y0, x1 - x0, y1 - y0);
  } else {
    ann.points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.closePath();
  }
}

function drawShape(ctx, ann, color, label, k, selected, draft = false) {
  ctx.save();
  tracePath(ctx, ann);
  ctx.fillStyle = color + (draft ? "22" : "33");
  ctx.fill();
  ctx.lineWidth = (selected ? 3 : 2) * k;
  ctx.lineJoin = "round";
  ctx.setLineDash(draft ? [6 * k, 4 * k] : []);
  ctx.shadowColor = "rgba(0,0,0,.6)";
  ctx.shadowBlur = 4 * k;
  ctx.strokeStyle = color;
  ctx.stroke();
  if (label) {
    const [x, y] = ann.kind === "box" ? [ann.box[0], ann.box[1]] : topLeft(ann.points);
    ctx.font = `600 ${13 * k}px system-ui, sans-serif`;
    const w = ctx.measureText(label).width + 10 * k, h = 19 * k;
    const ty = y - h - 3 * k >= 0 ? y - h - 3 * k : y + 3 * k;
    ctx.shadowBlur = 0;
    ctx.fillStyle = color;
    roundRect(ctx, x, ty, w, h, 5 * k);
    ctx.fill();
    ctx.fillStyle = "#0b0f16";
    ctx.textBaseline = "middle";
    ctx.fillText(label, x + 5 * k, ty + h / 2 + 0.5 * k);
  }
  ctx.restore();
}

function topLeft(points) {
  let best = points[0];
  for (const p of points) if (p[1] < best[1]) best = p;
  return best;
}

function roundRect(ctx, x, y, w, h, r) {
  ctx.beginPath();
  ctx.moveTo(x + r, y);
  ctx.arcTo(x + w, y, x + w, y + h, r);
  ctx.arcTo(x + w, y + h, x, y + h, r);
  ctx.arcTo(x, y + h, x, y, r);
  ctx.arcTo(x, y, x + w, y, r);
  ctx.closePath();
}

/** A freehand mask as the API's PNG part: white inside, transparent outside, frame-sized. */
export function maskPNG(points, width, height) {
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#ffffff";
  tracePath(ctx, { kind: "mask", points });
  ctx.fill();
  return new Promise((resolve) => c.toBlob(resolve, "image/png"));
}
