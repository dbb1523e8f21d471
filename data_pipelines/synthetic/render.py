"""Procedural indoor scenes rendered by vectorised ray casting in numpy, with exact depth and poses.

A scene is a closed box room (floor z = 0, ceiling z = height, four walls; world z is up) holding
coloured boxes, spheres and upright cylinders that stand on the floor, seen by V look-at cameras
that either orbit the room centre or walk along a line while panning. Surfaces are Lambertian with
world-anchored procedural textures (checker floor, wavy walls), so every view of a scene is
photometrically consistent. Depth is the exact camera z of the first hit of each pixel-centre ray.

Conventions (SPEC): OpenCV cameras (x right, y down, z forward), camera-to-world poses, pixel-index
intrinsics (pixel (i, j) is centred at u = j, v = i), metric depth.

Every scene is a pure function of (split, index, config): its random stream is
`np.random.default_rng([seed, SPLIT_CODES[split], index])`; streams with different
(split, index) entropy are disjoint by construction, so train/validation/test never share a scene.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.scene import Scene

SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
COLOURS = {  # object colours; distinct hues so a question can name an object by colour
    "red": (0.85, 0.12, 0.10), "green": (0.15, 0.65, 0.20), "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10), "purple": (0.55, 0.20, 0.75), "orange": (0.98, 0.50, 0.05),
    "cyan": (0.10, 0.80, 0.85), "white": (0.95, 0.95, 0.95),
}
SHAPES = ("box", "sphere", "cylinder")
NUM_ROOM_SURFACES = 6  # surface ids 0 floor, 1 ceiling, 2..5 walls (-x, +x, -y, +y); objects are 6 + k
_CLEARANCE = 0.35  # minimum gap (m) between a camera and an object's footprint, and between objects


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """What a synthetic scene looks like: image size, number of views, object count range."""

    height: int = 224
    width: int = 224
    num_views: int = 8
    min_objects: int = 3  # objects attempted per scene (fewer when placement finds no free spot)
    max_objects: int = 7
    seed: int = 0  # global seed; changes every scene of every split


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """An object standing on the floor. extent = half sizes (x, y, z) for a box (before yaw),
    (r, r, r) for a sphere, (r, r, half height) for a cylinder. center: world metres."""

    shape: str
    colour: str
    center: tuple[float, float, float]
    extent: tuple[float, float, float]
    yaw: float = 0.0  # rotation about world z (boxes only)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def footprint(self) -> float:
        """Radius (m) of a vertical cylinder around the centre that contains the object."""
        return float(np.hypot(self.extent[0], self.extent[1])) if self.shape == "box" else float(self.extent[0])


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything a scene's pixels and answers are computed from (world metres)."""

    half_x: float
    half_y: float
    room_height: float
    objects: tuple[SceneObject, ...]
    light: tuple[float, float, float]
    texture: dict  # procedural texture parameters (colours, frequencies, phases)


@dataclasses.dataclass(frozen=True)
class RenderedScene:
    """A rendered scene plus what the QA generator needs. object_ids: int16[V, H, W], -1 = room."""

    scene: Scene
    layout: Layout
    object_ids: np.ndarray


# --------------------------------------------------------------------------------------------------
# Layout and cameras
# --------------------------------------------------------------------------------------------------
def look_at(eye: np.ndarray, target: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """Camera-to-world float64[4, 4] of an OpenCV camera at eye looking at target, world z up."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = np.cos(roll), np.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, down, forward], axis=1)
    c2w[:3, 3] = eye
    return c2w


def _camera_path(rng: np.random.Generator, hx: float, hy: float, room_h: float, n: int) -> np.ndarray:
    """c2w float64[n, 4, 4]: an orbit around the room centre or a walk along a line while panning."""
    height = rng.uniform(1.1, min(1.9, room_h - 0.5))
    if rng.random() < 0.5:  # orbit: positions on an ellipse, looking at a point near the centre
        start, span = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.6) * np.pi * rng.choice([-1, 1])
        scale = rng.uniform(0.75, 0.9)
        angles = start + span * np.linspace(0, 1, n)
        eyes = np.stack([scale * (hx - 0.3) * np.cos(angles), scale * (hy - 0.3) * np.sin(angles),
                         height + rng.uniform(-0.1, 0.1, n)], axis=1)
        targets = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.2, 0.8)])
        targets = targets + rng.uniform(-0.25, 0.25, (n, 3))
    else:  # walk: a straight segment, heading along it, panning smoothly left/right, looking down
        a = np.array([rng.uniform(-hx + 0.5, -0.3 * hx), rng.uniform(-hy + 0.5, hy - 0.5)])
        b = np.array([rng.uniform(0.3 * hx, hx - 0.5), rng.uniform(-hy + 0.5, hy - 0.5)])
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        steps = np.linspace(0, 1, n)[:, None]
        xy = a + (b - a) * steps
        pan = rng.uniform(-0.7, 0.7) * np.sin(np.pi * steps[:, 0] * rng.uniform(0.5, 2))
        heading = np.arctan2(*(b - a)[::-1]) + pan
        pitch = rng.uniform(0.15, 0.5)
        eyes = np.concatenate([xy, np.full((n, 1), height)], axis=1)
        look = np.stack([np.cos(heading) * np.cos(pitch), np.sin(heading) * np.cos(pitch),
                         -np.full(n, np.sin(pitch))], axis=1)
        targets = eyes + look
    rolls = rng.uniform(-0.05, 0.05, n)
    return np.stack([look_at(e, t, r) for e, t, r in zip(eyes, targets, rolls)])


def _place_objects(rng: np.random.Generator, hx: float, hy: float, count: int,
                   cam_xy: np.ndarray) -> tuple[SceneObject, ...]:
    """Up to `count` objects with distinct (colour, shape), not overlapping each other or the cameras."""
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    order = rng.permutation(len(kinds))
    objects: list[SceneObject] = []
    for k in order[: 3 * count]:
        if len(objects) == count:
            break
        colour, shape = kinds[k]
        if shape == "box":
            extent, yaw = tuple(rng.uniform([0.2, 0.2, 0.15], [0.6, 0.6, 0.6])), float(rng.uniform(0, np.pi))
        elif shape == "sphere":
            extent, yaw = (float(rng.uniform(0.2, 0.5)),) * 3, 0.0
        else:
            r = float(rng.uniform(0.15, 0.4))
            extent, yaw = (r, r, float(rng.uniform(0.25, 0.7))), 0.0
        for _ in range(20):
            xy = rng.uniform([-hx + 0.4, -hy + 0.4], [hx - 0.4, hy - 0.4])
            obj = SceneObject(shape, colour, (float(xy[0]), float(xy[1]), float(extent[2])), extent, yaw)
            near_cam = np.min(np.linalg.norm(cam_xy - xy, axis=1)) < obj.footprint + _CLEARANCE
            near_obj = any(np.hypot(*(xy - o.center[:2])) < obj.footprint + o.footprint + 0.1 for o in objects)
            outside = abs(xy[0]) + obj.footprint > hx - 0.05 or abs(xy[1]) + obj.footprint > hy - 0.05
            if not (near_cam or near_obj or outside):
                objects.append(obj)
                break
    return tuple(objects)


def _texture_params(rng: np.random.Generator) -> dict:
    return {
        "floor": rng.uniform(0.3, 0.7, (2, 1)) + rng.uniform(-0.1, 0.1, (2, 3)),  # two greyish checker colours
        "tile": rng.uniform(0.3, 0.8),
        "walls": rng.uniform(0.45, 0.85, (4, 3)) * rng.uniform(0.85, 1.0, (4, 1)),
        "ceiling": rng.uniform(0.8, 0.95, 3),
        "freqs": rng.normal(0, 6.0, (4, 3)),  # noise: sum of 4 plane waves (rad / m)
        "phases": rng.uniform(0, 2 * np.pi, 4),
    }


def sample_layout(split: str, index: int, cfg: RenderConfig) -> tuple[Layout, np.ndarray, np.ndarray]:
    """(layout, c2w float64[V, 4, 4], intrinsics float64[3, 3]) of scene (split, index)."""
    if split not in SPLIT_CODES or index < 0:
        raise ValueError(f"synthetic scene ({split!r}, {index}): split must be one of {list(SPLIT_CODES)}, index >= 0")
    rng = np.random.default_rng([cfg.seed, SPLIT_CODES[split], index])
    hx, hy, room_h = rng.uniform(2.2, 4.0), rng.uniform(2.2, 4.0), rng.uniform(2.6, 3.4)
    c2w = _camera_path(rng, hx, hy, room_h, cfg.num_views)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects = _place_objects(rng, hx, hy, count, c2w[:, :2, 3])
    light = (float(rng.uniform(-0.5, 0.5) * hx), float(rng.uniform(-0.5, 0.5) * hy), room_h - 0.3)
    layout = Layout(float(hx), float(hy), float(room_h), objects, light, _texture_params(rng))
    fov_x = rng.uniform(np.radians(50), np.radians(85))  # varied intrinsics per scene
    fx = (cfg.width / 2) / np.tan(fov_x / 2)
    fy = fx * rng.uniform(0.97, 1.03)
    cx = (cfg.width - 1) / 2 + rng.uniform(-0.02, 0.02) * cfg.width
    cy = (cfg.height - 1) / 2 + rng.uniform(-0.02, 0.02) * cfg.height
    return layout, c2w, np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])


# --------------------------------------------------------------------------------------------------
# Ray casting. One view at a time: every ray of a view starts at the camera centre o float64[3];
# directions d float64[N, 3]. Hit functions return (t float64[N], inf = miss; normal float64[N, 3]).
# --------------------------------------------------------------------------------------------------
def _hit_room(o, d, hx, hy, hz):
    """Exit distance from the inside of the room box, and the surface id hit (0..5)."""
    lo, hi = np.array([-hx, -hy, 0.0]), np.array([hx, hy, hz])
    with np.errstate(divide="ignore", invalid="ignore"):
        t_axes = np.where(d > 0, (hi - o) / d, np.where(d < 0, (lo - o) / d, np.inf))  # [N, 3]
    axis = np.argmin(t_axes, axis=1)
    rows = np.arange(len(d))
    positive = d[rows, axis] > 0
    surface = np.select([axis == 2, axis == 0], [np.where(positive, 1, 0), np.where(positive, 3, 2)],
                        np.where(positive, 5, 4))
    return t_axes[rows, axis], surface


def _hit_sphere(o, d, obj):
    oc = o - np.asarray(obj.center)
    r = obj.extent[0]
    a = np.einsum("ni,ni->n", d, d)
    b = d @ oc
    disc = b * b - a * (oc @ oc - r * r)
    t = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
    t = np.where(t > 1e-6, t, np.inf)
    normal = (oc + np.where(np.isfinite(t), t, 0)[:, None] * d) / r
    return t, normal


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _hit_box(o, d, obj):
    """Slab test in the box frame (rotated by yaw about z)."""
    rot = _rot_z(obj.yaw)
    lo_, ld = (o - np.asarray(obj.center)) @ rot, d @ rot  # world -> box frame (row vectors: x @ R)
    half = np.asarray(obj.extent)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - lo_) / ld, (half - lo_) / ld
    t_near, t_far = np.fmin(t1, t2), np.fmax(t1, t2)
    axis = np.argmax(t_near, axis=1)
    rows = np.arange(len(d))
    t_in, t_out = t_near[rows, axis], t_far.min(axis=1)
    t = np.where((t_in <= t_out) & (t_in > 1e-6), t_in, np.inf)
    local_normal = np.zeros_like(ld)
    local_normal[rows, axis] = -np.sign(ld[rows, axis])
    return t, local_normal @ rot.T


def _hit_cylinder(o, d, obj):
    """Upright cylinder: side (quadratic in x, y) and the two caps."""
    oc = o - np.asarray(obj.center)
    r, h = obj.extent[0], obj.extent[2]
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = oc[0] * d[:, 0] + oc[1] * d[:, 1]
    disc = b * b - a * (oc[0] ** 2 + oc[1] ** 2 - r * r)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = np.where((disc >= 0) & (a > 0), (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
        t_side = np.where((np.abs(oc[2] + t_side * d[:, 2]) <= h) & (t_side > 1e-6), t_side, np.inf)
        t_cap = np.where(d[:, 2] < 0, h - oc[2], -h - oc[2]) / d[:, 2]
        p_cap = oc + t_cap[:, None] * d
    t_cap = np.where((p_cap[:, 0] ** 2 + p_cap[:, 1] ** 2 <= r * r) & (t_cap > 1e-6), t_cap, np.inf)
    side = t_side <= t_cap
    t = np.minimum(t_side, t_cap)
    p = oc + np.where(np.isfinite(t), t, 0)[:, None] * d
    normal = np.where(side[:, None], p * [1 / r, 1 / r, 0], [0, 0, 1] * np.sign(-d[:, 2:3]))
    return t, normal


_HITS = {"sphere": _hit_sphere, "box": _hit_box, "cylinder": _hit_cylinder}


def _wave_noise(p: np.ndarray, tex: dict) -> np.ndarray:
    """float32[N] in [-1, 1]: a sum of plane waves of world position p float[N, 3]."""
    return np.mean(np.sin(p.astype(np.float32) @ tex["freqs"].T.astype(np.float32)
                          + tex["phases"].astype(np.float32)), axis=1)


def _albedo(points, surface, layout: Layout) -> np.ndarray:
    """Per-pixel base colour float32[N, 3] from the surface id and the world hit point; each
    texture is evaluated only on the pixels that show its surface."""
    tex = layout.texture
    p = points.astype(np.float32)
    noise = _wave_noise(p, tex)[:, None]
    rgb = np.empty((len(p), 3), np.float32)
    floor = surface == 0
    checker = ((np.floor(p[floor, 0] / tex["tile"]) + np.floor(p[floor, 1] / tex["tile"])) % 2).astype(int)
    rgb[floor] = tex["floor"][checker] * (1 + 0.15 * noise[floor])
    ceiling = surface == 1
    rgb[ceiling] = tex["ceiling"] * (1 + 0.05 * noise[ceiling])
    walls = (surface >= 2) & (surface < NUM_ROOM_SURFACES)
    rgb[walls] = tex["walls"][surface[walls] - 2] * (1 + 0.25 * np.sin(6 * p[walls, 2:3] + 3 * noise[walls]))
    objects = surface >= NUM_ROOM_SURFACES
    colours = np.array([COLOURS[o.colour] for o in layout.objects] + [(0.0, 0.0, 0.0)], np.float32)
    rgb[objects] = colours[surface[objects] - NUM_ROOM_SURFACES] * (1 + 0.1 * noise[objects])
    return rgb


_ROOM_NORMALS = np.array([[0, 0, 1], [0, 0, -1], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]], dtype=np.float64)


def _bounding_radius(obj: SceneObject) -> float:
    return float(np.linalg.norm(obj.extent)) if obj.shape != "sphere" else float(obj.extent[0])


def cast_rays(layout: Layout, o: np.ndarray, d: np.ndarray):
    """First hits of rays from o float64[3] along d float64[N, 3] -> (t float64[N], surface int[N],
    normal float64[N, 3]). Each object is tested exactly only on the rays that pass through its
    bounding sphere, which is what keeps a 224 x 224 x 8 scene well under a second."""
    t, surface = _hit_room(o, d, layout.half_x, layout.half_y, layout.room_height)
    normal = _ROOM_NORMALS[surface]
    d_norm = np.linalg.norm(d, axis=1)
    for k, obj in enumerate(layout.objects):
        oc = np.asarray(obj.center) - o
        along = d @ oc / d_norm  # distance along the unit ray to the point nearest the centre
        near = (oc @ oc - along**2 <= _bounding_radius(obj) ** 2 + 1e-9) & (along > -_bounding_radius(obj))
        idx = np.flatnonzero(near)
        if idx.size == 0:
            continue
        t_obj, n_obj = _HITS[obj.shape](o, d[idx], obj)
        closer = t_obj < t[idx]
        hit = idx[closer]
        t[hit], surface[hit], normal[hit] = t_obj[closer], NUM_ROOM_SURFACES + k, n_obj[closer]
    return t, surface, normal


def render(layout: Layout, c2w: np.ndarray, intrinsics: np.ndarray, height: int, width: int):
    """-> (images uint8[V, H, W, 3], depth float32[V, H, W], object ids int16[V, H, W], -1 = room)."""
    jj, ii = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    rays_cam = np.stack([(jj - intrinsics[0, 2]) / intrinsics[0, 0], (ii - intrinsics[1, 2]) / intrinsics[1, 1],
                         np.ones_like(jj)], axis=-1).reshape(-1, 3)  # camera z = 1, so t is the depth
    images, depths, ids = [], [], []
    for pose in c2w:
        d = rays_cam @ pose[:3, :3].T
        t, surface, normal = cast_rays(layout, pose[:3, 3], d)
        points = pose[:3, 3] + t[:, None] * d
        to_light = np.asarray(layout.light) - points
        to_light /= np.linalg.norm(to_light, axis=1, keepdims=True)
        shade = 0.45 + 0.55 * np.clip(np.einsum("ni,ni->n", normal, to_light), 0, 1)
        rgb = np.clip(_albedo(points, surface, layout) * shade[:, None], 0, 1)
        images.append(np.round(rgb * 255).astype(np.uint8).reshape(height, width, 3))
        depths.append(t.astype(np.float32).reshape(height, width))
        ids.append((surface - NUM_ROOM_SURFACES).clip(-1).astype(np.int16).reshape(height, width))
    return np.stack(images), np.stack(depths), np.stack(ids)


def render_scene(split: str, index: int, cfg: RenderConfig = RenderConfig()) -> RenderedScene:
    """Scene (split, index): a pure function of its arguments (see the module docstring)."""
    layout, c2w, k = sample_layout(split, index, cfg)
    # Render with the float32-rounded cameras that the record stores, so depth is exact for them.
    c2w, k = c2w.astype(np.float32).astype(np.float64), k.astype(np.float32).astype(np.float64)
    images, depth, ids = render(layout, c2w, k, cfg.height, cfg.width)
    scene = Scene(scene_id=f"{split}_{index:07d}", dataset="synthetic", images=images, depth=depth,
                  intrinsics=np.repeat(k[None], len(c2w), axis=0).astype(np.float32),
                  c2w=c2w.astype(np.float32), z_far=0.0, normal_loss=True)
    return RenderedScene(scene, layout, ids)
