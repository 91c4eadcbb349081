# decode of the bench's TUM clip (32 of 120 frames, 640x480 mpeg4): isolated (as served) vs in-process, and
# FFmpeg thread counts in-process (0 = auto = one per core)
import json, statistics, sys, time
from pathlib import Path
def main():
    import av
    from loadtests.bench_pipeline import tum_clip
    from service import media as M
    p = tum_clip(Path("/tmp/tum-640x480.mp4"))
    out = {}
    def med(fn, n=9):
        fn(); ts = []
        for _ in range(n):
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        return round(statistics.median(ts), 4)
    out["isolated"] = med(lambda: M.decode_video(p, 32, M.MediaLimits(), [0], max_side=1280))
    out["in_process"] = med(lambda: M.decode_video(p, 32, M.MediaLimits(), [0], max_side=1280, isolate=False))
    orig = M._open
    for tc in (0, 1, 2, 4, 8):
        def opened(path, tc=tc):
            c = orig(path); c.streams.video[0].thread_count = tc; return c
        M._open = opened
        out[f"in_process_threads_{tc}"] = med(lambda: M.decode_video(p, 32, M.MediaLimits(), [0], max_side=1280, isolate=False))
    M._open = orig
    print(json.dumps(out))
if __name__ == "__main__":
    main()
