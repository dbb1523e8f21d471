"""`g2vlm reconstruct`: a folder of images -> coloured point cloud, depth maps, cameras (SPEC 4).

The official inference layout: the causal prompt "<|im_start|>Reconstruct the 3D scene." followed by every frame
in one bidirectional geometry chunk (data_pipelines/sequence.recon_sample), one forward pass, the
heads' local points (depth = local z), camera-to-world poses and world points. Intrinsics are
recovered from the local points by least squares (`geometry.recover_intrinsics`).

Images are resized as the official `recon` loads them (`load_and_resize14`): the first image sets the
size, `width` wide (floored to a multiple of 14) and round(H0 * width / W0 / 14) * 14 high; every image
is resized to it with PIL's Lanczos filter.

Output directory:
    points.ply          binary little-endian PLY: x y z (float32) red green blue (uchar); finite points only
    scene.glb           the same point cloud plus one wireframe frustum per camera (glTF binary)
    depth/NNNN.png      16-bit depth in millimetres (0 = no value / non-finite), `depth_png_scale` in cameras.json
    depth/NNNN_preview.png  the same depth coloured for viewing (turbo: dark blue = near, red = far; one
                        scale for all views, the 2nd-98th percentile of the scene; black = no value)
    depth/NNNN.npy      float32 depth (model units; metres for a metric model)
    cameras.json        per view: image, width, height, c2w [4][4] (OpenCV axes), intrinsics [3][3]
                        (pixel-index convention, u = fx x / z + cx); plus point counts
    sparse/0/           the same cameras and (subsampled) points as a COLMAP sparse model, cameras/images/
                        points3D in .txt and .bin (inference/colmap.py): opens in COLMAP, pycolmap, nerfstudio
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import pathlib
import re
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image, UnidentifiedImageError

from g2vlm_jax import geometry
from g2vlm_jax.console import progress
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.inference import colmap

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEPTH_PNG_SCALE = 1000.0  # depth PNG units per model unit (millimetres for metric depth)
FRUSTUM_DEPTH = 0.1  # frustum length as a fraction of the scene extent


def list_images(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """Image files of `folder` in natural order (2.png before 10.png)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder} is not a directory of images")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"--images {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return sorted(files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def frame_size(height: int, width: int, target_width: int) -> tuple[int, int]:
    """(h, w) the official loader resizes a first image of (height, width) to: `target_width` floored to a
    multiple of 14 (at least 14) wide, round(height * w / width / 14) * 14 high (at least 14). Every
    consumer of model frames (reconstruct, chat, the benchmarks' predictor) sizes frames by this rule."""
    w = max(14, target_width // 14 * 14)
    return max(14, round(height * w / width / 14) * 14), w


def resize_frame(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """One RGB image -> uint8[h, w, 3] at size (h, w) with PIL's Lanczos filter (the official resize)."""
    return np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.LANCZOS))


def _open_image(f: pathlib.Path, decode: bool = True) -> Image.Image:
    """The image of file f, decoded unless `decode` is False (then only its header is read); a file that
    cannot be read raises a ValueError naming it."""
    try:
        img = Image.open(f)
        if decode:
            img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {f} cannot be decoded ({e}); remove or replace it") from e
    return img


def load_images(files: list[pathlib.Path], width: int) -> np.ndarray:
    """Images resized as the official loader does (module docstring) -> uint8[V, H, W, 3].

    The first image's header sets the size; the images are decoded and resized on a thread pool (PIL
    releases the GIL in both), which halves the loading time on 2 cores (518x392 PNGs to 126x98: 2 frames
    14 -> 8 ms, 8 frames 55 -> 28 ms). Only one decoded full-size image per worker is alive at a time.
    """
    with _open_image(files[0], decode=False) as img:
        first = (files[0].name, img.width, img.height)
    size = frame_size(first[2], first[1], width)

    def load(f: pathlib.Path) -> tuple[np.ndarray, str | None]:
        with _open_image(f) as img:
            stretched = abs(img.width * first[2] - img.height * first[1]) > 0.01 * first[1] * img.height
            return resize_frame(img, size), (f"{f.name} {img.width}x{img.height}" if stretched else None)

    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1)) as pool:
        loaded = list(pool.map(load, files))
    stretched = [note for _, note in loaded if note]
    if stretched:
        logging.warning("%d of %d images have another aspect ratio than the first (%s %dx%d), e.g. %s; all are "
                        "resized to %dx%d as the official loader does, which stretches them: crop them to one "
                        "aspect ratio for undistorted geometry", len(stretched), len(files), *first,
                        ", ".join(stretched[:3]), size[1], size[0])
    return np.stack([frame for frame, _ in loaded])


def recon_batch(tok, images: np.ndarray):
    """The one-row PackedBatch of the reconstruction layout for uint8 images [V, H, W, 3]."""
    from data_pipelines import sequence
    from g2vlm_jax.inference.generate import pack_single_samples

    v, h, w = images.shape[:3]
    sample = sequence.recon_sample(tok, v, h, w, bos=True)  # the official `recon` prefill
    geo = (images.astype(np.float32) / 255.0)[None]
    return pack_single_samples([sample], geo, np.zeros((1, 0, 28, 28, 3), np.float32))


class _HashedGraph:
    """A graphdef as a jit static argument whose hash is computed once: hashing a GraphDef walks the
    whole module graph (~6 ms for the tiny model, on every call); equal graphs still share programs."""

    def __init__(self, graphdef):
        self.graphdef, self._hash = graphdef, hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _HashedGraph) and (self.graphdef is other.graphdef or self.graphdef == other.graphdef)


def _geometry(graph: _HashedGraph, state, batch):
    out = nnx.merge(graph.graphdef, state)(batch, compute_logits=False, global_points=False)
    return {k: out.geometry[k][0, 0] for k in ("local_points", "world_points", "camera_poses")}


@functools.lru_cache(maxsize=8)
def reconstruction_program(mesh, preset: str):
    """The reconstruction forward traced under `preset`'s activation rules on the model's `mesh`
    (one program per image shape, reused across calls)."""
    return sharding_lib.jit_sharded(_geometry, mesh, preset, static_argnames=("graph",))


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc through ctypes, or None where the C library is another (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Returns the heap memory that freed buffers left behind to the OS (glibc `malloc_trim`); False
    where there is no glibc.

    A reconstruction call allocates its program temporaries and outputs through malloc and frees them
    on return, but glibc keeps freed chunks below its (self-raising) mmap threshold in the process, so
    peak RSS crept up with every call: m27 at 2 views of 518x392 peaked at 729, 765 and 796 MiB after
    calls 1-3 (the official code: 781), flat at 731 MiB when trimmed after each call; 1-3 ms a trim.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class Reconstructor:
    """`predict` for many image sets with one model: the model is split into (graph, parameters) once.

    Splitting an nnx model walks its whole module graph (about 20 ms for the tiny model, as long as its
    forward at 126x98) and so does hashing the graph for the jit cache (done once here, `_HashedGraph`),
    so a loop over scenes builds one Reconstructor. It snapshots the model's parameters at construction: build a new one after
    changing them. Programs are the lru-cached `reconstruction_program`s (one per image shape).
    """

    def __init__(self, model, tok, *, preset: str = "dp"):
        self.tok = tok
        graphdef, self.state = nnx.split(model)
        self.graph = _HashedGraph(graphdef)
        self.forward = reconstruction_program(sharding_lib.mesh_of(self.state), preset)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 images [V, H, W, 3] -> float64 local_points / world_points [V, H, W, 3], c2w [V, 4, 4]."""
        batch = jax.tree.map(np.asarray, recon_batch(self.tok, images))
        geo = jax.device_get(self.forward(self.graph, self.state, batch))
        out = {"local_points": np.asarray(geo["local_points"], np.float64),
               "world_points": np.asarray(geo["world_points"], np.float64),
               "c2w": np.asarray(geo["camera_poses"], np.float64)}
        del batch, geo
        release_freed_memory()
        return out


def predict(model, tok, images: np.ndarray, *, preset: str = "dp") -> dict[str, np.ndarray]:
    """Runs the model once; returns float64 local_points / world_points [V, H, W, 3], c2w [V, 4, 4].

    `preset` is the sharding preset the model's parameters were placed with (`mesh.preset`). For many
    image sets with one model, build a `Reconstructor` once instead.
    """
    return Reconstructor(model, tok, preset=preset)(images)


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------
def write_ply(path: pathlib.Path, points: np.ndarray, colors: np.ndarray) -> None:
    """points float[N, 3], colors uint8[N, 3] -> binary PLY (x y z float, red green blue alpha uchar), by trimesh;
    `trimesh.load(path)` reads it back as a PointCloud."""
    import trimesh

    rgba = np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], axis=1)
    trimesh.PointCloud(np.asarray(points, np.float32), colors=rgba).export(str(path), file_type="ply", encoding="binary")


def frustum_segments(c2w: np.ndarray, k: np.ndarray, height: int, width: int, depth: float) -> np.ndarray:
    """Line segments [8, 2, 3] of a camera frustum (apex to 4 image corners, and the image rectangle)."""
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)
    rays = np.stack([(corners[:, 0] - k[0, 2]) / k[0, 0], (corners[:, 1] - k[1, 2]) / k[1, 1], np.ones(4)], -1)
    far = geometry.transform_points(c2w, rays * depth)
    apex = c2w[:3, 3]
    sides = [np.stack([apex, far[i]]) for i in range(4)]
    rim = [np.stack([far[i], far[(i + 1) % 4]]) for i in range(4)]
    return np.stack(sides + rim)


def write_glb(path: pathlib.Path, points: np.ndarray, colors: np.ndarray, c2w: np.ndarray, intrinsics: np.ndarray,
              height: int, width: int) -> None:
    import trimesh

    scene = trimesh.Scene()
    scene.add_geometry(trimesh.PointCloud(points, colors=np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], 1)),
                       geom_name="points")
    extent = float(np.ptp(points, axis=0).max()) if len(points) else 1.0
    for i, (pose, k) in enumerate(zip(c2w, intrinsics)):
        segments = frustum_segments(pose, k, height, width, FRUSTUM_DEPTH * extent)
        scene.add_geometry(trimesh.load_path(segments), geom_name=f"camera_{i:04d}")
    path.write_bytes(scene.export(file_type="glb"))


def depth_preview(depth: np.ndarray, valid: np.ndarray, near: float, far: float) -> np.ndarray:
    """uint8[H, W, 3]: depth coloured with matplotlib's turbo from `near` (dark blue) to `far` (red), black
    where there is no value; one scale for every view of a reconstruction, so colours compare across views."""
    from matplotlib import colormaps

    t = np.clip((depth - near) / max(far - near, 1e-9), 0.0, 1.0)
    rgb = (colormaps["turbo"](t)[..., :3] * 255).round().astype(np.uint8)
    return np.where(valid[..., None], rgb, 0).astype(np.uint8)


def write_reconstruction(out_dir: str | pathlib.Path, images: np.ndarray, world_points: np.ndarray,
                         depth: np.ndarray, c2w: np.ndarray, intrinsics: np.ndarray,
                         names: list[str]) -> dict:
    """Writes the output directory of the module docstring; returns the cameras.json content.

    images uint8[V, H, W, 3]; world_points [V, H, W, 3]; depth [V, H, W]; c2w [V, 4, 4]; intrinsics [V, 3, 3].
    Non-finite points (and depth <= 0) are dropped from the point cloud and counted.
    """
    out = pathlib.Path(out_dir)
    (out / "depth").mkdir(parents=True, exist_ok=True)
    v, h, w = images.shape[:3]
    keep = np.isfinite(world_points).all(-1) & np.isfinite(depth) & (depth > 0)
    points, colors = world_points[keep].astype(np.float32), images[keep]
    dropped = int(keep.size - keep.sum())
    if dropped:
        logging.warning("reconstruct: dropped %d non-finite or non-positive-depth points of %d", dropped, keep.size)
    steps = progress(total=v + 2, desc="writing", unit="file")  # depth maps, point cloud + COLMAP model, glb
    usable = np.isfinite(depth) & (depth > 0)
    near, far = np.percentile(depth[usable], [2, 98]) if usable.any() else (0.0, 1.0)
    for i in range(v):
        d = np.where(usable[i], depth[i], 0.0)
        np.save(out / "depth" / f"{i:04d}.npy", d.astype(np.float32))
        mm = np.clip(np.round(d * DEPTH_PNG_SCALE), 0, 65535).astype(np.uint16)
        Image.fromarray(mm).save(out / "depth" / f"{i:04d}.png")
        Image.fromarray(depth_preview(d, usable[i], near, far)).save(out / "depth" / f"{i:04d}_preview.png")
        steps.update()
    write_ply(out / "points.ply", points, colors)
    colmap.write_colmap(out / "sparse" / "0", images, np.where(keep[..., None], world_points, np.nan), c2w, intrinsics,
                        names)
    steps.update()
    write_glb(out / "scene.glb", points, colors, c2w, intrinsics, h, w)
    steps.update()
    steps.close()
    cameras = {"depth_png_scale": DEPTH_PNG_SCALE, "num_points": int(len(points)), "dropped_points": dropped,
               "views": [{"image": names[i], "width": w, "height": h, "c2w": c2w[i].tolist(),
                          "intrinsics": intrinsics[i].tolist()} for i in range(v)]}
    (out / "cameras.json").write_text(json.dumps(cameras, indent=1))
    return cameras


def reconstruct(model, tok, image_folder: str | pathlib.Path, out_dir: str | pathlib.Path, *, width: int,
                preset: str = "dp") -> dict:
    """The whole tool: load, predict, recover intrinsics, write. Returns the cameras.json content."""
    files = list_images(image_folder)
    images = load_images(files, width)
    logging.info("reconstruct: %d views at %dx%d", len(files), images.shape[2], images.shape[1])
    pred = predict(model, tok, images, preset=preset)
    depth = pred["local_points"][..., 2]
    intrinsics = geometry.recover_intrinsics(pred["local_points"])
    return write_reconstruction(out_dir, images, pred["world_points"], depth, pred["c2w"], intrinsics,
                                [f.name for f in files])
