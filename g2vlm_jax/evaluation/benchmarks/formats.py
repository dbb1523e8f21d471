"""Readers of the benchmark datasets' released file formats. Every reader raises DatasetLayoutError
naming the file and what was expected; none returns a silently wrong array.

    read_rgb(path)                      uint8[H, W, 3]
    read_png_depth(path, units)         float64[H, W] metres from a 16-bit PNG (value / units; 0 = no depth)
    read_sintel_dpt(path)               float64[H, W] from MPI-Sintel's .dpt (TAG 202021.25, width, height, floats)
    read_raw_float_depth(path, h, w)    float64[H, W] from headerless little-endian float32 (ETH3D)
    read_npy_depth(path)                float64[H, W] from a 2-D .npy (the extracted NYU-v2 test set)
    read_matrix_txt(path, rows)         float64[rows, 4] from whitespace-separated text (7-Scenes / NRGBD poses)
"""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError

SINTEL_TAG = 202021.25  # the float every Sintel .dpt / .cam file starts with (little-endian)
SINTEL_MAX_PIXELS = 100_000_000  # the released reader's sanity bound on width * height


def require_file(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.is_file():
        raise DatasetLayoutError(f"{path} is missing: expected {what}")
    return path


def _open_image(path: pathlib.Path, what: str) -> Image.Image:
    require_file(path, what)
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetLayoutError(f"{path} cannot be decoded as {what} ({e}); re-download or re-extract it") from None
    return img


def read_rgb(path: pathlib.Path) -> np.ndarray:
    """An image file -> uint8[H, W, 3]."""
    return np.asarray(_open_image(path, "an RGB image").convert("RGB"))


def read_png_depth(path: pathlib.Path, units_per_metre: float) -> np.ndarray:
    """A 16-bit depth PNG -> float64[H, W] metres = value / units_per_metre; 0 stays 0 (no depth).

    7-Scenes / NRGBD: millimetres (1000), Bonn / TUM: 5000, KITTI: 256. An 8-bit PNG is refused: it is not
    a depth map of these datasets (a converted or preview image)."""
    img = _open_image(path, "a 16-bit depth PNG")
    values = np.asarray(img)
    if values.ndim != 2 or values.dtype not in (np.uint16, np.int32) or img.mode not in ("I;16", "I;16B", "I"):
        raise DatasetLayoutError(f"{path} is a {img.mode} image with {values.ndim} dims; expected a single-channel "
                                 f"16-bit depth PNG ({units_per_metre:g} units per metre)")
    if values.min() < 0 or values.max() > 65535:
        raise DatasetLayoutError(f"{path} holds values outside 0..65535; expected a 16-bit depth PNG")
    return values.astype(np.float64) / units_per_metre


def read_sintel_dpt(path: pathlib.Path) -> np.ndarray:
    """MPI-Sintel depth (.dpt): float32 TAG 202021.25, int32 width, int32 height, width*height float32."""
    raw = require_file(path, "a Sintel .dpt depth file").read_bytes()
    if len(raw) < 12 or np.frombuffer(raw[:4], "<f4")[0] != np.float32(SINTEL_TAG):
        raise DatasetLayoutError(f"{path} does not start with the Sintel tag {SINTEL_TAG}; expected a .dpt depth file "
                                 "from MPI-Sintel-depth-training")
    width, height = (int(x) for x in np.frombuffer(raw[4:12], "<i4"))
    if not (width > 0 and height > 0 and 1 < width * height < SINTEL_MAX_PIXELS):
        raise DatasetLayoutError(f"{path} has a bad size header ({width} x {height}); the file is damaged")
    if len(raw) != 12 + 4 * width * height:
        raise DatasetLayoutError(f"{path} holds {len(raw) - 12} data bytes; its header ({width} x {height}) needs "
                                 f"{4 * width * height}: the file is truncated or damaged")
    return np.frombuffer(raw[12:], "<f4").reshape(height, width).astype(np.float64)


def read_raw_float_depth(path: pathlib.Path, height: int, width: int) -> np.ndarray:
    """Headerless float32 depth of an image of (height, width) (ETH3D; inf/NaN/<= 0 = no depth) -> float64[H, W]."""
    raw = require_file(path, "an ETH3D float32 depth map").read_bytes()
    if len(raw) != 4 * height * width:
        raise DatasetLayoutError(f"{path} holds {len(raw)} bytes; its image is {width} x {height}, so it must hold "
                                 f"{4 * height * width} (float32 per pixel)")
    return np.frombuffer(raw, "<f4").reshape(height, width).astype(np.float64)


def read_npy_depth(path: pathlib.Path) -> np.ndarray:
    """A 2-D float .npy depth map in metres -> float64[H, W]."""
    require_file(path, "a .npy depth map")
    try:
        depth = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DatasetLayoutError(f"{path} is not a readable .npy array ({e}); re-extract it") from None
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
        raise DatasetLayoutError(f"{path} holds a {depth.dtype} array of shape {depth.shape}; expected a 2-D depth map")
    return depth.astype(np.float64)


def read_matrix_txt(path: pathlib.Path, rows: int | None = 4) -> np.ndarray:
    """Whitespace-separated 4-column text -> float64[rows, 4] (rows=None: any multiple of 4 rows)."""
    require_file(path, "a text file of 4x4 pose matrices")
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DatasetLayoutError(f"{path} is not a whitespace-separated number matrix ({e})") from None
    if values.shape[1:] != (4,) or (rows is not None and values.shape[0] != rows) or values.shape[0] % 4:
        expected = f"{rows} x 4" if rows is not None else "4k x 4 (one 4x4 matrix per frame)"
        raise DatasetLayoutError(f"{path} holds a {values.shape[0]} x {values.shape[1] if values.ndim > 1 else 0} "
                                 f"matrix; expected {expected}")
    return values


def resize_depth_nearest(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float[H, W] -> float64[h, w] by nearest neighbour (depth is never interpolated across edges)."""
    img = Image.fromarray(np.asarray(depth, np.float32)).resize((size[1], size[0]), Image.NEAREST)
    return np.asarray(img, np.float64)


def resize_depth_bicubic(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float[h, w] prediction -> float64[H, W] bicubic (the protocols resize predictions to the GT size)."""
    img = Image.fromarray(np.asarray(depth, np.float32)).resize((size[1], size[0]), Image.BICUBIC)
    return np.asarray(img, np.float64)


def scale_intrinsics(k: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """K [3, 3] of an image of from_size (H, W) -> K of the same image resized to to_size (h, w),
    pixel-centre convention (u' + 0.5 = (u + 0.5) * w / W)."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    out = np.array(k, np.float64)
    out[0, 0], out[0, 2] = k[0, 0] * sx, (k[0, 2] + 0.5) * sx - 0.5
    out[1, 1], out[1, 2] = k[1, 1] * sy, (k[1, 2] + 0.5) * sy - 0.5
    return out
