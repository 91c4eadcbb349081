// WebGL2 point-cloud viewer for a job's scene (GET /v1/spatial-qa/{id}/scene).
// Byte layout: model/geometry/scene_export.py. World axes are OpenCV's (x right, y down, z forward)
// in the first sampled camera's frame; the orbit camera keeps -y as "up".

import { BOX_EDGES } from "./measure.js";

const MAGIC = "SR3DSCN1";
const HEADER_BYTES = 48;

/** Parse scene bytes into typed-array views (no copies). Throws on anything malformed. */
export function parseScene(buf) {
  const dv = new DataView(buf);
  const magic = new TextDecoder().decode(new Uint8Array(buf, 0, 8));
  if (magic !== MAGIC || dv.getUint32(8, true) !== HEADER_BYTES) throw new Error("not an SR-3D scene");
  const n = dv.getUint32(12, true), f = dv.getUint32(16, true), r = dv.getUint32(20, true);
  const s = {
    n, f, r, width: dv.getUint32(24, true), height: dv.getUint32(28, true),
    scale: dv.getFloat32(32, true), metric: (dv.getUint32(36, true) & 1) === 1,
  };
  if (buf.byteLength !== HEADER_BYTES + f * 84 + n * 17) throw new Error("scene size does not match its header");
  let off = HEADER_BYTES;
  const take = (Type, count) => { const a = new Type(buf, off, count); off += a.byteLength; return a; };
  s.poses = take(Float32Array, f * 16); // row-major camera-to-world
  s.intrinsics = take(Float32Array, f * 4); // fx fy cx cy
  s.frameIndices = take(Uint32Array, f);
  s.positions = take(Float32Array, n * 3);
  s.colors = take(Uint8Array, n * 3);
  s.region = take(Uint8Array, n);
  s.camera = take(Uint8Array, n);
  return s;
}

// ---- tiny column-major mat4 helpers -------------------------------------------------------------
const perspective = (fovy, aspect, near, far) => {
  const f = 1 / Math.tan(fovy / 2), nf = 1 / (near - far);
  return new Float32Array([f / aspect, 0, 0, 0, 0, f, 0, 0, 0, 0, (far + near) * nf, -1, 0, 0, 2 * far * near * nf, 0]);
};
const sub = (a, b) => [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
const norm = (a) => { const l = Math.hypot(...a) || 1; return [a[0] / l, a[1] / l, a[2] / l]; };
const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
const lookAt = (eye, target, up) => {
  const z = norm(sub(eye, target)), x = norm(cross(up, z)), y = cross(z, x);
  return new Float32Array([x[0], y[0], z[0], 0, x[1], y[1], z[1], 0, x[2], y[2], z[2], 0, -dot(x, eye), -dot(y, eye), -dot(z, eye), 1]);
};
const mul = (a, b) => {
  const o = new Float32Array(16);
  for (let c = 0; c < 4; c++) for (let r = 0; r < 4; r++) {
    let v = 0;
    for (let k = 0; k < 4; k++) v += a[k * 4 + r] * b[c * 4 + k];
    o[c * 4 + r] = v;
  }
  return o;
};
const hexRGB = (hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16) / 255);

const POINT_VS = `#version 300 es
layout(location=0) in vec3 aPos;
layout(location=1) in vec3 aColor;
layout(location=2) in float aRegion;
uniform mat4 uMVP;
uniform float uSize;
uniform vec3 uRegionColors[16];
uniform float uHasRegions;
out vec3 vColor;
out float vRegion;
void main() {
  gl_Position = uMVP * vec4(aPos, 1.0);
  int r = int(aRegion + 0.5);
  float size = uSize / max(gl_Position.w, 1e-3);
  if (r > 0) {
    vColor = mix(uRegionColors[(r - 1) % 16], aColor, 0.18);
    size *= 1.7;
  } else {
    // Regions exist: the rest of the scene steps back a little (less saturated, darker).
    float g = dot(aColor, vec3(0.299, 0.587, 0.114));
    vColor = mix(aColor, vec3(g), 0.45 * uHasRegions) * mix(1.0, 0.72, uHasRegions);
  }
  vRegion = float(r);
  gl_PointSize = clamp(size, 1.0, r > 0 ? 9.0 : 6.0);
  // Region points win depth ties: other frames see the same surface unlabelled.
  if (r > 0) gl_Position.z -= 0.004 * gl_Position.w;
}`;
const POINT_FS = `#version 300 es
precision mediump float;
in vec3 vColor;
in float vRegion;
out vec4 outColor;
void main() {
  vec2 d = gl_PointCoord * 2.0 - 1.0;
  float r2 = dot(d, d);
  if (r2 > 1.0) discard;
  float shade = vRegion > 0.5 ? 1.0 - 0.25 * r2 : 1.0;  // region points read as little spheres
  outColor = vec4(vColor * shade, 1.0);
}`;
const LINE_VS = `#version 300 es
layout(location=0) in vec3 aPos;
layout(location=1) in vec4 aColor;
uniform mat4 uMVP;
uniform vec2 uShift;  // clip-space nudge (per unit w): the overlay is drawn a few times, 1 px apart, to read thicker
out vec4 vColor;
void main() { gl_Position = uMVP * vec4(aPos, 1.0); gl_Position.xy += uShift * gl_Position.w; vColor = aColor; }`;
const LINE_FS = `#version 300 es
precision mediump float;
in vec4 vColor;
out vec4 outColor;
void main() { outColor = vColor; }`;

function program(gl, vs, fs) {
  const p = gl.createProgram();
  for (const [type, src] of [[gl.VERTEX_SHADER, vs], [gl.FRAGMENT_SHADER, fs]]) {
    const s = gl.createShader(type);
    gl.shaderSource(s, src);
    gl.compileShader(s);
    if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s));
    gl.attachShader(p, s);
  }
  gl.linkProgram(p);
  if (!gl.getProgramParameter(p, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(p));
  return p;
}

export class Viewer {
  /** labels: an element laid over the canvas (absolutely positioned, same box) for the distance labels. */
  constructor(canvas, labels = null) {
    this.canvas = canvas;
    this.labels = labels;
    this.overlay = null; // {vao, count, segments: [{mid, el}]}
    this.showOverlay = true;
    const gl = canvas.getContext("webgl2", { antialias: true, alpha: true, preserveDrawingBuffer: true });
    if (!gl) throw new Error("WebGL2 is not available in this browser");
    this.gl = gl;
    this.points = program(gl, POINT_VS, POINT_FS);
    this.lines = program(gl, LINE_VS, LINE_FS);
    this.scene = null;
    this.autoRotate = true;
    this.frame = null;
    this._bindMouse();
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  /** Show a parsed scene; regionColors: ["#rrggbb", ...] in region order. */
  setScene(scene, regionColors) {
    const gl = this.gl;
    this.scene = scene;
    this.clearOverlay(); // a new job's scene: the last job's boxes are not about it
    if (this.vaoPoints) { gl.deleteVertexArray(this.vaoPoints); gl.deleteVertexArray(this.vaoLines); }
    this.vaoPoints = gl.createVertexArray();
    gl.bindVertexArray(this.vaoPoints);
    const attr = (loc, data, size, type, normalized) => {
      const b = gl.createBuffer();
      gl.bindBuffer(gl.ARRAY_BUFFER, b);
      gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW);
      gl.enableVertexAttribArray(loc);
      gl.vertexAttribPointer(loc, size, type, normalized, 0, 0);
    };
    attr(0, scene.positions, 3, gl.FLOAT, false);
    attr(1, scene.colors, 3, gl.UNSIGNED_BYTE, true);
    attr(2, scene.region, 1, gl.UNSIGNED_BYTE, false);

    this._frame(scene);
    const lines = this._cameraLines(scene);
    this.lineCount = lines.length / 7;
    this.vaoLines = gl.createVertexArray();
    gl.bindVertexArray(this.vaoLines);
    const b = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, b);
    gl.bufferData(gl.ARRAY_BUFFER, lines, gl.STATIC_DRAW);
    gl.enableVertexAttribArray(0);
    gl.vertexAttribPointer(0, 3, gl.FLOAT, false, 28, 0);
    gl.enableVertexAttribArray(1);
    gl.vertexAttribPointer(1, 4, gl.FLOAT, false, 28, 12);
    gl.bindVertexArray(null);

    const flat = new Float32Array(48);
    regionColors.slice(0, 16).forEach((c, i) => flat.set(hexRGB(c), i * 3));
    this.regionColors = flat;
    this.reset();
    this._loop();
  }

  /** Measurement boxes and distance segments (measure.js `sceneOverlay`, in scene coordinates): each
   * box's 12 edges in its region's colour, each segment in white with a DOM label at its midpoint.
   * The canvas says what it holds (data-boxes, data-segments) for tests and tools. */
  setOverlay({ boxes, segments }) {
    const gl = this.gl;
    if (this.overlay) gl.deleteVertexArray(this.overlay.vao);
    const verts = [];
    for (const b of boxes) {
      const c = [...hexRGB(b.color), 1];
      for (const [i, j] of BOX_EDGES) verts.push(...b.corners[i], ...c, ...b.corners[j], ...c);
    }
    for (const s of segments) verts.push(...s.from, 1, 1, 1, 1, ...s.to, 1, 1, 1, 1);
    const vao = gl.createVertexArray();
    gl.bindVertexArray(vao);
    gl.bindBuffer(gl.ARRAY_BUFFER, gl.createBuffer());
    gl.bufferData(gl.ARRAY_BUFFER, new Float32Array(verts), gl.STATIC_DRAW);
    gl.enableVertexAttribArray(0);
    gl.vertexAttribPointer(0, 3, gl.FLOAT, false, 28, 0);
    gl.enableVertexAttribArray(1);
    gl.vertexAttribPointer(1, 4, gl.FLOAT, false, 28, 12);
    gl.bindVertexArray(null);
    const labels = segments.map((s) => {
      const el = document.createElement("span");
      el.className = "seg-label";
      el.textContent = s.text;
      el.dataset.pair = `${s.a}-${s.b}`;
      el.dataset.value = String(s.value);
      return { mid: [0, 1, 2].map((i) => (s.from[i] + s.to[i]) / 2), el };
    });
    if (this.labels) this.labels.replaceChildren(...labels.map((l) => l.el));
    this.overlay = { vao, count: verts.length / 7, labels };
    this.canvas.dataset.boxes = String(boxes.length);
    this.canvas.dataset.segments = String(segments.length);
    this.draw();
  }

  clearOverlay() {
    if (this.overlay) this.gl.deleteVertexArray(this.overlay.vao);
    this.overlay = null;
    if (this.labels) this.labels.replaceChildren();
    delete this.canvas.dataset.boxes;
    delete this.canvas.dataset.segments;
  }

  /** Show or hide the boxes, segments and labels. */
  setOverlayVisible(on) {
    this.showOverlay = on;
    if (this.labels) this.labels.hidden = !on;
    this.draw();
  }

  reset() {
    this.yaw = 0.55;
    this.pitch = 0.32;
    this.dist = this.radius * 2.4;
    this.target = this.center.slice();
    this.autoRotate = true;
    this.draw();
  }

  /** Robust centre (per-axis median) and radius (85th percentile distance), so stray depth outliers
   * do not shrink the scene to a dot. */
  _frame(scene) {
    const n = scene.n, p = scene.positions;
    const step = Math.max(1, Math.floor(n / 20000));
    const axis = (k) => { const a = []; for (let i = 0; i < n; i += step) a.push(p[i * 3 + k]); a.sort((x, y) => x - y); return a[a.length >> 1] || 0; };
    this.center = n ? [axis(0), axis(1), axis(2)] : [0, 0, 1];
    const d = [];
    for (let i = 0; i < n; i += step) d.push(Math.hypot(p[i * 3] - this.center[0], p[i * 3 + 1] - this.center[1], p[i * 3 + 2] - this.center[2]));
    d.sort((x, y) => x - y);
    let radius = Math.max(d[Math.floor(d.length * 0.85)] || 1, 1e-3);
    for (let c = 0; c < scene.f; c++) { // keep the cameras in the picture too
      const P = scene.poses.subarray(c * 16, c * 16 + 16);
      radius = Math.max(radius, 0.8 * Math.hypot(P[3] - this.center[0], P[7] - this.center[1], P[11] - this.center[2]));
    }
    this.radius = radius;
  }

  /** Frusta (apex + image rectangle at a depth that suits the scene) and the camera path. */
  _cameraLines(scene) {
    const out = [];
    const depth = this.radius * 0.22;
    const start = hexRGB("#5ec8ff"), end = hexRGB("#c39bff");
    const centers = [];
    for (let c = 0; c < scene.f; c++) {
      const P = scene.poses.subarray(c * 16, c * 16 + 16);
      const [fx, fy, cx, cy] = scene.intrinsics.subarray(c * 4, c * 4 + 4);
      const toWorld = (x, y, z) => [0, 1, 2].map((r) => P[r * 4] * x + P[r * 4 + 1] * y + P[r * 4 + 2] * z + P[r * 4 + 3]);
      const t = scene.f > 1 ? c / (scene.f - 1) : 0;
      const col = [0, 1, 2].map((k) => start[k] + (end[k] - start[k]) * t);
      const apex = toWorld(0, 0, 0);
      const corner = (u, v) => toWorld((u - cx) / fx * depth, (v - cy) / fy * depth, depth);
      const q = [corner(0, 0), corner(scene.width, 0), corner(scene.width, scene.height), corner(0, scene.height)];
      const seg = (a, b, alpha) => out.push(...a, ...col, alpha, ...b, ...col, alpha);
      for (let k = 0; k < 4; k++) { seg(apex, q[k], 0.55); seg(q[k], q[(k + 1) % 4], 0.9); }
      seg(q[0], [(q[0][0] + q[1][0]) / 2, (q[0][1] + q[1][1]) / 2 - depth * 0.12, (q[0][2] + q[1][2]) / 2], 0.9); // "up" tick
      centers.push(apex);
    }
    for (let c = 1; c < centers.length; c++) out.push(...centers[c - 1], 1, 1, 1, 0.35, ...centers[c], 1, 1, 1, 0.35);
    return new Float32Array(out);
  }

  _bindMouse() {
    const c = this.canvas;
    let drag = null;
    c.addEventListener("contextmenu", (e) => e.preventDefault());
    c.addEventListener("pointerdown", (e) => {
      if (!this.scene) return;
      c.setPointerCapture(e.pointerId);
      drag = { x: e.clientX, y: e.clientY, pan: e.button === 2 || e.shiftKey };
      this.autoRotate = false;
    });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      drag.x = e.clientX; drag.y = e.clientY;
      if (drag.pan) {
        const k = this.dist / c.clientHeight;
        const { right, up } = this._basis();
        for (let i = 0; i < 3; i++) this.target[i] += (-dx * right[i] + dy * up[i]) * k;
      } else {
        this.yaw += dx * 0.008;
        this.pitch = Math.max(-1.45, Math.min(1.45, this.pitch + dy * 0.008));
      }
      this.draw();
    });
    const end = () => { drag = null; };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    c.addEventListener("wheel", (e) => {
      if (!this.scene) return;
      e.preventDefault();
      this.autoRotate = false;
      this.dist = Math.max(this.radius * 0.05, Math.min(this.radius * 40, this.dist * Math.exp(e.deltaY * 0.0015)));
      this.draw();
    }, { passive: false });
    c.addEventListener("dblclick", () => this.scene && this.reset());
  }

  _eye() {
    const cp = Math.cos(this.pitch);
    const off = [cp * Math.sin(this.yaw), -Math.sin(this.pitch), -cp * Math.cos(this.yaw)];
    return [0, 1, 2].map((i) => this.target[i] + off[i] * this.dist);
  }

  _basis() {
    const fwd = norm(sub(this.target, this._eye()));
    const right = norm(cross(fwd, [0, -1, 0]));
    return { right, up: cross(right, fwd) };
  }

  _loop() {
    if (this.frame) return;
    const tick = (t) => {
      this.frame = null;
      if (!this.autoRotate || !this.scene) return;
      this.yaw += 0.0025;
      this.draw();
      this.frame = requestAnimationFrame(tick);
    };
    this.frame = requestAnimationFrame(tick);
  }

  draw() {
    const gl = this.gl, c = this.canvas;
    const dpr = Math.min(window.devicePixelRatio || 1, 2);
    const w = Math.max(1, Math.round(c.clientWidth * dpr)), h = Math.max(1, Math.round(c.clientHeight * dpr));
    if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    gl.viewport(0, 0, w, h);
    gl.clearColor(0, 0, 0, 0);
    gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
    if (!this.scene) return;
    if (!this.autoRotate) { if (this.frame) cancelAnimationFrame(this.frame); this.frame = null; }
    const proj = perspective(50 * Math.PI / 180, w / h, this.dist * 0.01, this.dist + this.radius * 20);
    const mvp = mul(proj, lookAt(this._eye(), this.target, [0, -1, 0]));
    gl.enable(gl.DEPTH_TEST);

    gl.useProgram(this.points);
    gl.uniformMatrix4fv(gl.getUniformLocation(this.points, "uMVP"), false, mvp);
    gl.uniform1f(gl.getUniformLocation(this.points, "uSize"), 0.012 * h * this.radius);
    gl.uniform3fv(gl.getUniformLocation(this.points, "uRegionColors"), this.regionColors);
    gl.uniform1f(gl.getUniformLocation(this.points, "uHasRegions"), this.scene.r > 0 ? 1 : 0);
    gl.bindVertexArray(this.vaoPoints);
    gl.drawArrays(gl.POINTS, 0, this.scene.n);

    gl.enable(gl.BLEND);
    gl.blendFunc(gl.SRC_ALPHA, gl.ONE_MINUS_SRC_ALPHA);
    gl.useProgram(this.lines);
    gl.uniformMatrix4fv(gl.getUniformLocation(this.lines, "uMVP"), false, mvp);
    gl.bindVertexArray(this.vaoLines);
    gl.uniform2f(gl.getUniformLocation(this.lines, "uShift"), 0, 0);
    gl.drawArrays(gl.LINES, 0, this.lineCount);
    if (this.overlay && this.showOverlay) this._drawOverlay(mvp, w, h);
    gl.disable(gl.BLEND);
    gl.bindVertexArray(null);
  }

  /** Boxes and segments over everything (no depth test: a box stays readable behind its own points),
   * 2 px thick (lines are 1 px in WebGL), and each label moved to its segment's projected midpoint. */
  _drawOverlay(mvp, w, h) {
    const gl = this.gl;
    gl.disable(gl.DEPTH_TEST);
    gl.bindVertexArray(this.overlay.vao);
    const shift = gl.getUniformLocation(this.lines, "uShift");
    for (const [dx, dy] of [[0, 0], [2, 0], [0, 2], [2, 2]]) {
      gl.uniform2f(shift, dx / w, dy / h);
      gl.drawArrays(gl.LINES, 0, this.overlay.count);
    }
    gl.uniform2f(shift, 0, 0);
    gl.enable(gl.DEPTH_TEST);
    const cw = this.canvas.clientWidth, ch = this.canvas.clientHeight;
    for (const { mid, el } of this.overlay.labels) {
      const x = mvp[0] * mid[0] + mvp[4] * mid[1] + mvp[8] * mid[2] + mvp[12];
      const y = mvp[1] * mid[0] + mvp[5] * mid[1] + mvp[9] * mid[2] + mvp[13];
      const cw4 = mvp[3] * mid[0] + mvp[7] * mid[1] + mvp[11] * mid[2] + mvp[15];
      el.hidden = cw4 <= 1e-6; // behind the eye
      if (el.hidden) continue;
      el.style.left = `${((x / cw4) * 0.5 + 0.5) * cw}px`;
      el.style.top = `${(0.5 - (y / cw4) * 0.5) * ch}px`;
    }
  }
}
