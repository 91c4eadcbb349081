"""Camera poses for RGB-D frames sent without poses (phones, depth sensors): features + depth -> poses.

Method, per frame in order (frame 0, or the first usable frame, is the reference = identity):
1. SIFT keypoints on the colour image; matches against a few already registered frames (the previous
   one and the keyframes nearest to it, so an error in one pair does not propagate: drift is bounded by
   the keyframes, not accumulated frame by frame), Lowe's ratio test plus a mutual-best check.
2. The matched keypoints of the registered frames are lifted to 3D with their depth and their known
   pose; `cv2.solvePnPRansac` gives the new camera from these 3D-2D correspondences (the new frame's own
   depth is not needed here, so frames with holes still register), then Levenberg-Marquardt on the inliers.
3. Refinement of the translation: dense projective point-to-plane ICP of the frame's depth against the
   same registered frames (all at once, Huber-weighted). Keypoints localise rotation well but
   translation poorly at small baselines; the dense depth pins it down (why not rotation too: see
   `_icp_translation`). The ICP result is kept only if it stays close to the feature estimate.
4. Verification: the frame's own depth, placed with the new pose, must lie on the registered frames'
   surfaces where they overlap (catches a wrong pose, and depth in the wrong units).
A frame that fails (too few keypoints, matches or inliers, or depth that disagrees) is reported with a
reason and retried once after the first pass against more registered frames (the nearest in time); it
is never given a made-up pose.

Pure computation on numpy arrays + OpenCV (pinned major version in pyproject.toml).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from model.geometry.intrinsics import broadcast_intrinsics
from model.geometry.project import backproject
from model.geometry.rgbd import SceneError, pointmaps_from_rgbd
from model.geometry.types import PointMaps


@dataclass(frozen=True)
class PoseRecoveryConfig:
    max_features: int = 2000
    # SIFT's default (0.04) finds too few keypoints on motion-blurred frames (TUM fr1_rpy frame 9: 75);
    # 0.01 gives ~9x more there and twice as many matches elsewhere.
    contrast_threshold: float = 0.01
    feature_max_side: int = 1280  # SIFT runs on the image shrunk to this (bounded work for 4K frames)
    min_features: int = 30  # fewer keypoints than this: the frame is unusable (blank, dark, blurred)
    ratio: float = 0.8  # Lowe's ratio test
    min_inliers: int = 20  # PnP inliers needed to accept a registration
    # ... and this share of the matches: on TUM fr1_rpy good frames have 0.32-0.86, the motion-blurred
    # frame 9 0.09 (its pose then swung 6-10 deg with the RANSAC draw): too weak to trust.
    min_inlier_ratio: float = 0.15
    reproj_px_per_width: float = 0.006  # RANSAC threshold relative to the image width (3.8 px at 640)
    max_candidates: int = 4  # registered frames matched against (previous + nearest keyframes)
    retry_candidates: int = 8  # second chance for a failed frame: this many registered frames nearest in time
    keyframe_deg: float = 8.0  # a registered frame farther than this from every keyframe becomes one
    keyframe_m: float = 0.08
    icp_width: int = 160  # ICP runs on depth subsampled to about this width
    icp_iters: int = 15
    icp_max_correction_m: float = 0.05  # ICP may move the feature estimate at most this far
    min_depth_agreement: float = 0.5  # share of the frame's overlapping depth that must fit the others


@dataclass(frozen=True)
class PoseRecoveryResult:
    poses_c2w: np.ndarray  # float64 [F, 4, 4] camera-to-world, reference = identity; NaN where unregistered
    registered: np.ndarray  # bool [F]
    inliers: list[int]  # PnP inliers of each frame's registration (0 for the reference and unregistered ones)
    reasons: dict[int, str] = field(default_factory=dict)  # frame -> why it is not registered
    reference: int = 0  # the frame whose camera is the world frame (-1: nothing registered)
    keyframes: tuple[int, ...] = ()
    refined: tuple[bool, ...] = ()  # per frame: the dense ICP refinement was applied

    @property
    def num_registered(self) -> int:
        return int(self.registered.sum())


@dataclass
class _Features:
    xy: np.ndarray  # float32 [N, 2] keypoint pixels
    desc: np.ndarray  # float32 [N, 128]
    z: np.ndarray  # float64 [N] depth at the keypoint, 0 where missing or on a depth edge


@dataclass
class _DepthPyr:
    points: np.ndarray  # float64 [h, w, 3] camera points of the subsampled depth
    normals: np.ndarray  # float64 [h, w, 3]; 0 where unknown
    valid: np.ndarray  # bool [h, w]: point and normal usable
    K: np.ndarray  # intrinsics of the subsampled grid


def _features(sift: cv2.SIFT, image: np.ndarray, depth: np.ndarray, max_side: int) -> _Features:
    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    f = min(1.0, max_side / max(gray.shape))
    if f < 1.0:
        gray = cv2.resize(gray, (round(gray.shape[1] * f), round(gray.shape[0] * f)), interpolation=cv2.INTER_AREA)
    kps, desc = sift.detectAndCompute(gray, None)
    if not kps:
        return _Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), np.zeros(0))
    # Back to full-resolution pixels (pixel centres at integers in both grids).
    sx, sy = image.shape[1] / gray.shape[1], image.shape[0] / gray.shape[0]
    xy = (np.array([k.pt for k in kps], dtype=np.float64) + 0.5) * np.array([sx, sy]) - 0.5
    # Keypoints sit on image edges, often depth edges too: take depth only where the 3x3 neighbourhood
    # is complete and smooth, otherwise a foreground pixel lends its depth to the background.
    d = depth.astype(np.float32)
    kernel = np.ones((3, 3), np.uint8)
    dmax, dmin = cv2.dilate(d, kernel), cv2.erode(d, kernel)
    u = np.clip(np.rint(xy[:, 0]).astype(int), 0, d.shape[1] - 1)
    v = np.clip(np.rint(xy[:, 1]).astype(int), 0, d.shape[0] - 1)
    z = d[v, u].astype(np.float64)
    smooth = (dmin[v, u] > 0) & (dmax[v, u] - dmin[v, u] < 0.03 * z + 0.01)
    return _Features(xy, desc.astype(np.float32), np.where(smooth & np.isfinite(z), z, 0.0))


def _match(matcher: cv2.BFMatcher, a: _Features, b: _Features, ratio: float) -> np.ndarray:
    """Index pairs [M, 2] (into a, into b): ratio test a->b, kept only if also b's best match is a."""
    if len(a.xy) < 2 or len(b.xy) < 2:
        return np.zeros((0, 2), int)
    fwd = matcher.knnMatch(a.desc, b.desc, k=2)
    back = matcher.match(b.desc, a.desc)
    best_back = np.full(len(b.xy), -1)
    for m in back:
        best_back[m.queryIdx] = m.trainIdx
    pairs = [
        (m[0].queryIdx, m[0].trainIdx)
        for m in fwd
        if len(m) == 2 and m[0].distance < ratio * m[1].distance and best_back[m[0].trainIdx] == m[0].queryIdx
    ]
    return np.array(pairs, dtype=int).reshape(-1, 2)


def _lift(xy: np.ndarray, z: np.ndarray, K: np.ndarray) -> np.ndarray:
    ray = np.linalg.solve(K, np.column_stack([xy, np.ones(len(xy))]).T).T
    return ray * z[:, None]


def _pyramid(depth: np.ndarray, K: np.ndarray, width: int) -> _DepthPyr:
    s = max(1, int(round(depth.shape[1] / width)))
    d = depth[::s, ::s].astype(np.float64)  # strided, not averaged: averaging mixes depths across edges
    Ks = K.astype(np.float64).copy()
    Ks[:2] /= s
    valid = np.isfinite(d) & (d > 0)
    P = backproject(np.where(valid, d, 0.0), Ks)
    # Normals from central differences; undefined at holes and depth edges.
    dx = np.zeros_like(P)
    dy = np.zeros_like(P)
    dx[:, 1:-1] = P[:, 2:] - P[:, :-2]
    dy[1:-1] = P[2:] - P[:-2]
    n = np.cross(dx, dy)
    norm = np.linalg.norm(n, axis=-1)
    ok = valid.copy()
    ok[:, 1:-1] &= valid[:, 2:] & valid[:, :-2]
    ok[1:-1] &= valid[2:] & valid[:-2]
    ok[:, [0, -1]] = False
    ok[[0, -1]] = False
    z = np.where(valid, d, 1.0)
    ok &= (np.linalg.norm(dx, axis=-1) < 0.1 * z) & (np.linalg.norm(dy, axis=-1) < 0.1 * z) & (norm > 0)
    n = np.where(ok[..., None], n / np.maximum(norm, 1e-12)[..., None], 0.0)
    n *= np.where((n * P).sum(-1, keepdims=True) > 0, -1.0, 1.0)  # face the camera
    return _DepthPyr(points=P, normals=n, valid=ok, K=Ks)


def _associate(X: np.ndarray, tgt: _DepthPyr, T_t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projective data association: world points X [N, 3] -> the target's pixel they fall on.
    Returns (indices into X, target points in world, target normals in world) for usable pixels."""
    y = (X - T_t[:3, 3]) @ T_t[:3, :3]  # into the target camera
    front = y[:, 2] > 1e-6
    uv = (y[front] / y[front, 2:]) @ tgt.K.T
    u = np.rint(uv[:, 0]).astype(int)
    v = np.rint(uv[:, 1]).astype(int)
    h, w = tgt.valid.shape
    inb = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    idx, u, v = np.flatnonzero(front)[inb], u[inb], v[inb]
    ok = tgt.valid[v, u]
    idx, u, v = idx[ok], u[ok], v[ok]
    return idx, tgt.points[v, u] @ T_t[:3, :3].T + T_t[:3, 3], tgt.normals[v, u] @ T_t[:3, :3].T


def _depth_agreement(src: _DepthPyr, T: np.ndarray, targets: list[tuple[_DepthPyr, np.ndarray]]) -> tuple[int, float]:
    """(overlapping points, fraction of them on the target's surface within 3 cm + 3 % of depth).
    Occlusions and depth noise keep a right pose well above half; a wrong pose, or depth in other units,
    lands far below."""
    p = src.points[src.valid]
    X = p @ T[:3, :3].T + T[:3, 3]
    total = agree = 0
    for tgt, T_t in targets:
        idx, q, n = _associate(X, tgt, T_t)
        r = np.abs(((X[idx] - q) * n).sum(1))
        total += len(idx)
        agree += int((r < 0.03 + 0.03 * p[idx, 2]).sum())
    return total, agree / max(total, 1)


def _icp_translation(
    src: _DepthPyr, T_src: np.ndarray, targets: list[tuple[_DepthPyr, np.ndarray]], iters: int
) -> tuple[np.ndarray, int]:
    """Point-to-plane ICP of `src` (camera points, pose T_src c2w) against several registered depth maps
    at once (projective association, Huber weights), solving for the camera's translation only.

    Rotation stays the feature estimate's: on TUM fr1_rpy (up to 90 deg/s) a 6-DoF ICP fits the depth
    better than the ground truth does (point-to-plane median 0.37 vs 0.54 cm on frames 0-1, depth at 320 px) yet lands
    1 deg from it (likely because the depth is captured ~7 ms after the colour image, on another sensor,
    while the camera turns at up to 90 deg/s), whereas the colour features measure rotation at the colour
    image's time, the one the ground truth is given for. Measured: 6-DoF ICP gave ATE 1.9 cm with RPE
    2.9 cm / 1.6 deg on that window, translation-only 2.1 cm with 2.3 cm / 1.15 deg (before the inlier
    checks that now reject its blurred frame 9). Translation is what features get
    wrong at centimetre baselines and what dense depth pins down. Returns (pose, matches)."""
    p = src.points[src.valid]
    T = T_src.copy()
    matches = 0
    for it in range(iters):
        dist = 0.10 if it < iters // 3 else 0.04  # coarse gate first, then tight
        X = p @ T[:3, :3].T + T[:3, 3]
        A = np.zeros((3, 3))
        b = np.zeros(3)
        matches = 0
        for tgt, T_t in targets:
            idx, q, n = _associate(X, tgt, T_t)
            diff = X[idx] - q
            close = np.linalg.norm(diff, axis=1) < dist
            n, diff = n[close], diff[close]
            r = (diff * n).sum(1)
            huber = 0.01
            wgt = np.where(np.abs(r) < huber, 1.0, huber / np.maximum(np.abs(r), 1e-12))
            A += (n * wgt[:, None]).T @ n
            b += (n * wgt[:, None]).T @ r
            matches += len(r)
        if matches < 100:
            return T_src, matches
        step = -np.linalg.solve(A + 1e-9 * np.eye(3), b)
        T[:3, 3] += step
        if np.linalg.norm(step) < 1e-5:
            break
    return T, matches


def _relative_motion(A: np.ndarray, B: np.ndarray) -> tuple[float, float]:
    """(rotation degrees, translation metres) between two c2w poses."""
    D = np.linalg.inv(A) @ B
    c = np.clip((np.trace(D[:3, :3]) - 1) / 2, -1, 1)
    return float(np.degrees(np.arccos(c))), float(np.linalg.norm(D[:3, 3]))


def recover_poses(
    depth: np.ndarray, intrinsics: np.ndarray, images: np.ndarray, config: PoseRecoveryConfig | None = None
) -> PoseRecoveryResult:
    """Camera-to-world poses (OpenCV axes, metres, reference camera = identity) for F RGB-D frames.

    depth float metres [F, H, W] (0 / non-finite = hole), intrinsics [F, 3, 3] or [3, 3],
    images uint8 [F, H, W, 3] RGB, registered pixel for pixel with the depth."""
    cfg = config or PoseRecoveryConfig()
    depth = np.asarray(depth, dtype=np.float64)
    images = np.asarray(images)
    if depth.ndim != 3 or images.shape != (*depth.shape, 3) or images.dtype != np.uint8:
        raise ValueError(f"need depth [F,H,W] and uint8 images [F,H,W,3]; got {depth.shape}, {images.shape} {images.dtype}")
    F, H, W = depth.shape
    K = broadcast_intrinsics(intrinsics, F).astype(np.float64)
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0)

    sift = cv2.SIFT_create(nfeatures=cfg.max_features, contrastThreshold=cfg.contrast_threshold)
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    feats = [_features(sift, images[i], depth[i], cfg.feature_max_side) for i in range(F)]
    pyrs: dict[int, _DepthPyr] = {}

    def pyr(i: int) -> _DepthPyr:
        if i not in pyrs:
            pyrs[i] = _pyramid(depth[i], K[i], cfg.icp_width)
        return pyrs[i]

    poses = np.full((F, 4, 4), np.nan)
    registered = np.zeros(F, bool)
    inliers = [0] * F
    refined = [False] * F
    reasons: dict[int, str] = {}
    for i, f in enumerate(feats):
        if len(f.xy) < cfg.min_features:
            reasons[i] = f"no_features: {len(f.xy)} keypoints (< {cfg.min_features}); blank, dark or blurred image"
    usable = [i for i in range(F) if i not in reasons and (feats[i].z > 0).sum() >= cfg.min_inliers]
    for i in range(F):
        if i not in reasons and i not in usable:
            reasons[i] = f"no_depth: under {cfg.min_inliers} keypoints with valid depth"
    if not usable:
        return PoseRecoveryResult(poses, registered, inliers, reasons, -1, (), tuple(refined))
    ref = usable[0]
    # A frame before the reference lacked features or depth for being the reference itself; it may still
    # register against later frames (its own depth is optional for PnP).
    for i in range(ref):
        if reasons.get(i, "").startswith("no_depth"):
            del reasons[i]
    poses[ref] = np.eye(4)
    registered[ref] = True
    keyframes = [ref]
    thr = cfg.reproj_px_per_width * W

    def register(q: int, candidates: list[int]) -> str | None:
        """Try to register frame q against registered `candidates`; returns the failure reason or None."""
        obj, img = [], []
        for c in candidates:
            m = _match(matcher, feats[q], feats[c], cfg.ratio)
            if len(m) == 0:
                continue
            zc = feats[c].z[m[:, 1]]
            keep = zc > 0
            m = m[keep]
            Xc = _lift(feats[c].xy[m[:, 1]], zc[keep], K[c])
            obj.append(Xc @ poses[c][:3, :3].T + poses[c][:3, 3])
            img.append(feats[q].xy[m[:, 0]].astype(np.float64))
        n = sum(len(o) for o in obj)
        if n < cfg.min_inliers:
            return f"too_few_matches: {n} matches with depth against frames {candidates} (< {cfg.min_inliers})"
        obj_a, img_a = np.concatenate(obj), np.concatenate(img)
        ok, rvec, tvec, inl = cv2.solvePnPRansac(
            obj_a, img_a, K[q], None, iterationsCount=2000, reprojectionError=thr, confidence=0.9999,
            flags=cv2.SOLVEPNP_EPNP,
        )
        ninl = 0 if inl is None else len(inl)
        if not ok or ninl < max(cfg.min_inliers, cfg.min_inlier_ratio * n):
            return (
                f"too_few_inliers: {ninl} of {n} matches agree on one camera pose "
                f"(need {cfg.min_inliers} and {100 * cfg.min_inlier_ratio:.0f} %)"
            )
        inl = inl.reshape(-1)
        # LM on the inliers, then re-select the inliers under the refined pose and refine again: the
        # result depends on the data, not on which minimal sample RANSAC happened to draw last.
        for _ in range(3):
            rvec, tvec = cv2.solvePnPRefineLM(obj_a[inl], img_a[inl], K[q], None, rvec, tvec)
            proj = cv2.projectPoints(obj_a, rvec, tvec, K[q], None)[0].reshape(-1, 2)
            inl = np.flatnonzero(np.linalg.norm(proj - img_a, axis=1) < thr)
            if len(inl) < cfg.min_inliers:
                return f"too_few_inliers: {len(inl)} of {n} matches agree on the refined camera pose (< {cfg.min_inliers})"
        ninl = len(inl)
        w2c = np.eye(4)
        w2c[:3, :3] = cv2.Rodrigues(rvec)[0]
        w2c[:3, 3] = tvec.reshape(3)
        T = np.linalg.inv(w2c)
        if (depth[q] > 0).any():
            T_icp, nm = _icp_translation(pyr(q), T, [(pyr(c), poses[c]) for c in candidates], cfg.icp_iters)
            if nm >= 100 and np.linalg.norm(T_icp[:3, 3] - T[:3, 3]) <= cfg.icp_max_correction_m:
                T = T_icp
                refined[q] = True
        if (depth[q] > 0).any():
            overlap, frac = _depth_agreement(pyr(q), T, [(pyr(c), poses[c]) for c in candidates])
            if overlap >= 100 and frac < cfg.min_depth_agreement:
                return (
                    f"depth_inconsistent: the pose from {ninl} keypoints puts only {100 * frac:.0f} % of this "
                    f"frame's depth on the registered frames' surfaces (< {100 * cfg.min_depth_agreement:.0f} %)"
                )
        poses[q] = T
        registered[q] = True
        inliers[q] = ninl
        return None

    def nearest_keyframes(anchor: int, k: int) -> list[int]:
        cost = []
        for kf in keyframes:
            dr, dt = _relative_motion(poses[anchor], poses[kf])
            cost.append(dr / cfg.keyframe_deg + dt / cfg.keyframe_m)
        return [keyframes[j] for j in np.argsort(cost)[:k]]

    def maybe_keyframe(q: int) -> None:
        far = all(
            (lambda m: m[0] > cfg.keyframe_deg or m[1] > cfg.keyframe_m)(_relative_motion(poses[q], poses[kf]))
            for kf in keyframes
        )
        if far:
            keyframes.append(q)

    last = ref
    order = [i for i in range(F) if i != ref and i not in reasons]
    for q in order:
        cands = list(dict.fromkeys([last, *nearest_keyframes(last, cfg.max_candidates)]))[: cfg.max_candidates]
        why = register(q, cands)
        if why is None:
            last = q
            maybe_keyframe(q)
        else:
            reasons[q] = why
    # Second chance: frames that failed in order (e.g. before the reference, or after a blurred run)
    # against the registered frames nearest in time.
    for q in [i for i in order if not registered[i]]:
        done = np.flatnonzero(registered)
        cands = [int(c) for c in done[np.argsort(np.abs(done - q), kind="stable")][: cfg.retry_candidates]]
        why = register(q, cands)
        if why is None:
            del reasons[q]
            maybe_keyframe(q)
        else:
            reasons[q] = why
    return PoseRecoveryResult(poses, registered, inliers, reasons, ref, tuple(keyframes), tuple(refined))


def pointmaps_from_recovered(depth: np.ndarray, intrinsics: np.ndarray, result: PoseRecoveryResult) -> PointMaps:
    """PointMaps of the RGB-D path (same back-projection and canonical frame) with the recovered poses.

    An unregistered frame contributes no points (valid all False); its pose slot holds the pose of the
    nearest registered frame only so the array stays finite — `result.registered` says which are real."""
    depth = np.asarray(depth, dtype=np.float64)
    if result.num_registered == 0:
        raise SceneError(
            "scene_unregistrable",
            "no frame of the scene could be registered (no camera poses sent, and none recovered from the images: "
            + "; ".join(f"frame {i}: {r}" for i, r in sorted(result.reasons.items())[:4])
            + ")",
        )
    done = np.flatnonzero(result.registered)
    poses = result.poses_c2w.copy()
    for i in np.flatnonzero(~result.registered):
        poses[i] = poses[done[np.argmin(np.abs(done - i))]]
    masked = np.where(result.registered[:, None, None], depth, 0.0)  # 0 = hole: the RGB-D path drops it
    pm = pointmaps_from_rgbd(masked, intrinsics, poses, reference_frame=result.reference)
    return replace(pm, source="pose-recovery")


def pointmaps_without_poses(
    depth: np.ndarray, intrinsics: np.ndarray, images: np.ndarray, config: PoseRecoveryConfig | None = None
) -> tuple[PointMaps, PoseRecoveryResult]:
    """The backend's one call: recover poses, then build the point maps. The result carries the
    registered count and the per-frame reasons for the progress event and the job's timings."""
    result = recover_poses(depth, intrinsics, images, config)
    return pointmaps_from_recovered(depth, intrinsics, result), result
