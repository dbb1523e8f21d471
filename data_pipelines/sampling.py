"""From a decoded Scene to V training views: frame sampling, crop/scale jitter, resize, colour jitter.

All randomness comes from an explicit `np.random.Generator`, so a view sample is a pure function of
(scene, rng state). Geometry stays exact: intrinsics follow every crop and resize, depth is resized
with nearest neighbour (no invented depths), world points come from the resized depth.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from data_pipelines.scene import Scene
from g2vlm_jax import geometry


@dataclasses.dataclass(frozen=True)
class ViewSample:
    """V views of one scene at the training resolution.

    images: float32[V, H, W, 3] in [0, 1]; depth: float32[V, H, W]; intrinsics: float32[V, 3, 3];
    c2w: float32[V, 4, 4]; world_points: float32[V, H, W, 3]; valid: bool[V, H, W];
    frames: the scene frame index of each view (view 0 is the reference frame).
    """

    images: np.ndarray
    depth: np.ndarray
    intrinsics: np.ndarray
    c2w: np.ndarray
    world_points: np.ndarray
    valid: np.ndarray
    frames: tuple[int, ...]
    dataset: str
    normal_loss: bool


def sample_frames(num_frames: int, views: int, rng: np.random.Generator) -> list[int]:
    """SPEC 3 frame sampling; returns `views` frame indices, the reference first, the rest shuffled.

    With views > 16 and probability 0.1: random frames of the scene. Otherwise a random reference
    frame and a window of ±30·views frames around it, sampled uniformly (50%) or one per stratum
    (50%). Scenes with fewer frames than `views` repeat frames (sampling with replacement).
    """
    if num_frames <= 0:
        raise ValueError("sample_frames: the scene has no frames")
    replace = num_frames < views
    if views > 16 and rng.random() < 0.1:
        frames = rng.choice(num_frames, size=views, replace=replace)
        return [int(f) for f in frames]
    ref = int(rng.integers(num_frames))
    lo, hi = max(0, ref - 30 * views), min(num_frames, ref + 30 * views + 1)
    window = np.array([f for f in range(lo, hi) if f != ref])
    need = views - 1
    if need == 0:
        return [ref]
    if len(window) < need:
        others = rng.choice(window, size=need, replace=True) if len(window) else np.full(need, ref)
    elif rng.random() < 0.5:
        others = rng.choice(window, size=need, replace=False)
    else:  # one frame per stratum of the window
        strata = np.array_split(window, need)
        others = np.array([rng.choice(s) for s in strata])
    others = rng.permutation(others)
    return [ref] + [int(f) for f in others]


def crop_resize(image: np.ndarray, depth: np.ndarray, k: np.ndarray, out_hw: tuple[int, int], scale: float = 1.0):
    """Crop centred on the principal point, then resize to out_hw; returns (image, depth, K).

    The crop is the largest window of the output aspect ratio centred on (cx, cy) that fits the
    image, shrunk by `scale` (<= 1, the scale jitter). Lanczos for the image, nearest for depth.
    """
    h, w = depth.shape
    oh, ow = out_hw
    cx, cy = float(k[0, 2]), float(k[1, 2])
    # Half-extents that stay inside the image around the principal point.
    half_w = min(cx, w - cx)
    half_h = min(cy, h - cy)
    aspect = ow / oh
    crop_w = min(2 * half_w, 2 * half_h * aspect) * scale
    crop_h = crop_w / aspect
    crop_w_i, crop_h_i = max(int(round(crop_w)), 1), max(int(round(crop_h)), 1)
    x0 = int(round(cx - crop_w_i / 2))
    y0 = int(round(cy - crop_h_i / 2))
    x0, y0 = min(max(x0, 0), w - crop_w_i), min(max(y0, 0), h - crop_h_i)
    img = Image.fromarray(image[y0:y0 + crop_h_i, x0:x0 + crop_w_i]).resize((ow, oh), Image.LANCZOS)
    dep = Image.fromarray(depth[y0:y0 + crop_h_i, x0:x0 + crop_w_i]).resize((ow, oh), Image.NEAREST)
    sx, sy = ow / crop_w_i, oh / crop_h_i
    k2 = k.astype(np.float64).copy()
    k2[0, 0] *= sx
    k2[1, 1] *= sy
    # Pixel-index convention u = fx x / z + cx: a pixel index i of the crop maps to output index
    # (i + 0.5) * s - 0.5 under PIL's centre-aligned resampling.
    k2[0, 2] = (k[0, 2] - x0 + 0.5) * sx - 0.5
    k2[1, 2] = (k[1, 2] - y0 + 0.5) * sy - 0.5
    return np.asarray(img), np.asarray(dep, np.float32), k2.astype(np.float32)


def _jitter_params(rng: np.random.Generator) -> dict:
    """Official colour-jitter draw: b/c/s 0.5, hue 0.1 with p 0.9; grayscale with p 0.05."""
    return {"apply": rng.random() < 0.9, "brightness": rng.uniform(0.5, 1.5), "contrast": rng.uniform(0.5, 1.5),
            "saturation": rng.uniform(0.5, 1.5), "hue": rng.uniform(-0.1, 0.1), "gray": rng.random() < 0.05,
            "order": rng.permutation(4)}


def _gray(x: np.ndarray) -> np.ndarray:
    return (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def color_jitter(image: np.ndarray, p: dict) -> np.ndarray:
    """Applies brightness/contrast/saturation/hue (in a random order) and grayscale to [H,W,3] in [0,1]."""
    x = image
    if p["apply"]:
        for op in p["order"]:
            if op == 0:
                x = np.clip(x * p["brightness"], 0, 1)
            elif op == 1:
                x = np.clip((x - _gray(x).mean()) * p["contrast"] + _gray(x).mean(), 0, 1)
            elif op == 2:
                x = np.clip((x - _gray(x)) * p["saturation"] + _gray(x), 0, 1)
            else:
                hsv = _rgb_to_hsv(x)
                h = (hsv[0] + p["hue"]) % 1.0
                x = _hsv_to_rgb(np.stack([h, hsv[1], hsv[2]], -1))
    if p["gray"]:
        x = np.repeat(_gray(x), 3, axis=-1)
    return x.astype(np.float32)


def _rgb_to_hsv(x: np.ndarray):
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    safe = np.where(d > 0, d, 1)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = np.where(d > 0, h, 0.0)
    s = np.where(mx > 0, d / np.where(mx > 0, mx, 1), 0.0)
    return h, s, mx


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] * 6, hsv[..., 1], hsv[..., 2]
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, np.float32)
    for idx, (r, g, b) in enumerate(table):
        m = i == idx
        out[m] = np.stack([r[m], g[m], b[m]], -1)
    return out


def sample_views(scene: Scene, views: int, out_hw: tuple[int, int], rng: np.random.Generator, *,
                 augment: bool, frames: list[int] | None = None) -> ViewSample:
    """Samples `views` frames of `scene`, crops/resizes them to out_hw and (optionally) augments them."""
    frames = frames if frames is not None else sample_frames(scene.num_views, views, rng)
    shared = augment and rng.random() < 0.7  # one colour jitter for every view 70% of the time
    shared_params = _jitter_params(rng) if augment else None
    scale = 0.9 + 0.1 * rng.beta(0.5, 0.5) if augment else 1.0
    imgs, depths, ks = [], [], []
    for f in frames:
        img, dep, k = crop_resize(scene.images[f], scene.depth[f], scene.intrinsics[f], out_hw, scale)
        x = img.astype(np.float32) / 255.0
        if augment:
            x = color_jitter(x, shared_params if shared else _jitter_params(rng))
        imgs.append(x)
        depths.append(dep)
        ks.append(k)
    depth = np.stack(depths)
    intr = np.stack(ks)
    c2w = scene.c2w[frames].astype(np.float32)
    world = geometry.depth_to_world_points(depth.astype(np.float64), intr.astype(np.float64), c2w.astype(np.float64))
    valid = np.isfinite(depth) & (depth > 0) & np.isfinite(world).all(-1)
    if scene.z_far > 0:
        valid &= depth < scene.z_far
    world = np.where(valid[..., None], world, 0.0).astype(np.float32)
    return ViewSample(images=np.stack(imgs), depth=depth, intrinsics=intr, c2w=c2w, world_points=world, valid=valid,
                      frames=tuple(frames), dataset=scene.dataset, normal_loss=scene.normal_loss)
