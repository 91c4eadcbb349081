// Media in the browser: a video's frames by their ORIGINAL index (the API's `frame`), or an image.
//
// The server numbers a video's frames in presentation order (service/media/probe.py: the sorted packet
// timestamps). The page finds the frame duration from two adjacent presented frames
// (requestVideoFrameCallback's mediaTime), then reads every shown frame's index from its own
// timestamp: index = round((mediaTime - first) * fps). That is exact for constant-frame-rate video;
// for variable frame rate it is an approximation (the server's index counts frames, not time).
// Browsers without requestVideoFrameCallback fall back to 30 fps and currentTime.

const FALLBACK_FPS = 30;

/** Seek and resolve with the presented frame's metadata (null when the browser cannot say). */
function seekTo(video, t) {
  return new Promise((resolve) => {
    let settled = false;
    const finish = (meta) => { if (!settled) { settled = true; resolve(meta); } };
    if ("requestVideoFrameCallback" in video) video.requestVideoFrameCallback((_now, meta) => finish(meta));
    // The same frame shown again presents nothing: settle on `seeked` after a grace period.
    video.addEventListener("seeked", () => setTimeout(() => finish(null), 300), { once: true });
    video.currentTime = Math.max(0, t);
  });
}

function loadVideo(url) {
  const v = document.createElement("video");
  v.muted = true;
  v.playsInline = true;
  v.preload = "auto";
  v.src = url;
  return new Promise((resolve, reject) => {
    v.addEventListener("loadeddata", () => resolve(v), { once: true });
    v.addEventListener("error", () => reject(new Error("this browser cannot decode the video (the server may still accept it)")), { once: true });
  });
}

export class VideoMedia {
  kind = "video";

  static async open(file) {
    const url = URL.createObjectURL(file);
    const m = new VideoMedia();
    m.file = file;
    m.url = url;
    m.video = await loadVideo(url);
    m.width = m.video.videoWidth;
    m.height = m.video.videoHeight;
    await m._probe();
    m.thumbVideo = await loadVideo(url);
    return m;
  }

  async _probe() {
    const v = this.video;
    const first = await seekTo(v, 0);
    this.t0 = first ? first.mediaTime : 0;
    this.fps = FALLBACK_FPS;
    this.exact = false;
    const mid = Math.min(v.duration / 2, this.t0 + 1.0);
    const a = await seekTo(v, mid);
    if (a) {
      const b = await seekTo(v, a.mediaTime - 1e-3); // the frame just before `a`
      const dt = b ? a.mediaTime - b.mediaTime : 0;
      if (dt > 1e-4 && dt < 1) { this.fps = 1 / dt; this.exact = true; }
    }
    this.count = Math.max(1, Math.round((v.duration - this.t0) * this.fps));
    this.index = 0;
  }

  /** Show frame k on this.video; resolves with the index actually presented. */
  async seek(k) {
    k = Math.max(0, Math.min(this.count - 1, k));
    const meta = await seekTo(this.video, this.t0 + (k + 0.5) / this.fps); // mid-frame: no rounding at edges
    this.index = meta ? Math.round((meta.mediaTime - this.t0) * this.fps) : k;
    return this.index;
  }

  get source() { return this.video; }

  /** Thumbnails of n evenly spaced frames, drawn one by one into canvases via onThumb(k, canvas). */
  async thumbs(n, height, onThumb) {
    n = Math.min(n, this.count);
    const w = Math.round(height * this.width / this.height);
    for (let i = 0; i < n; i++) {
      const k = n === 1 ? 0 : Math.round(i * (this.count - 1) / (n - 1));
      await seekTo(this.thumbVideo, this.t0 + (k + 0.5) / this.fps);
      const c = document.createElement("canvas");
      c.width = w * 2;
      c.height = height * 2;
      c.getContext("2d").drawImage(this.thumbVideo, 0, 0, c.width, c.height);
      onThumb(k, c);
    }
  }

  close() { URL.revokeObjectURL(this.url); }
}

export class ImageMedia {
  kind = "image";
  count = 1;
  index = 0;
  fps = 0;
  exact = true;

  static async open(file) {
    const m = new ImageMedia();
    m.file = file;
    m.bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    m.width = m.bitmap.width;
    m.height = m.bitmap.height;
    return m;
  }

  async seek() { return 0; }
  get source() { return this.bitmap; }
  async thumbs() {}
  close() { this.bitmap.close(); }
}

export async function openMedia(file) {
  const isVideo = file.type.startsWith("video/") || /\.(mp4|m4v|mov|webm|mkv)$/i.test(file.name);
  return isVideo ? VideoMedia.open(file) : ImageMedia.open(file);
}
