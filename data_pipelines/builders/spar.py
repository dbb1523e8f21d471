"""`spar_qa`: SPAR-style spatial QA rows (jsonl) -> one scene record per row, holding one QAPair.

Accepted row format (one JSON object per line; key names follow the released SPAR-7M annotations):

    image_list       [str] * V       image paths, relative to the source folder (manual_dir) or absolute
    depth_list       [str] * V       uint16 depth PNGs; metres = value * depth_scale
    depth_scale      float           optional, default config.depth_scale (0.001: millimetres)
    poses            V x (4x4 | 16)  camera-to-world, OpenCV axes
    intrinsic        3x3 | 4x4 | 16, or a list of V of them: intrinsics of the images
    depth_intrinsic  same, optional: intrinsics of the depth maps. When a depth map's size differs
                     from its image's, the image is resized (Lanczos) to the depth size and
                     depth_intrinsic is used (required then), as the official ScanNet path does.
    question, answer str
    answer_type      'numeric' | 'choice', optional: inferred as 'numeric' when the answer parses
                     as a number, 'choice' when it is one option letter A-F; other rows are skipped
    task             str, optional (default metadata.type, else 'spar')
    choices          [str], optional ("A. ...")
    markers          [[view, u, v, label]], optional, pixel coordinates of the *source* images
    metadata         optional official form: {"type": ..., "<colour>_point": [[x, y]] in 0..1000,
                     "point_img_idx": [[view of 1st point, view of 2nd, ...]]}; its points become
                     markers labelled with the colour. Rows with box markers ('<colour>_bbox') are
                     skipped: QAPair.markers holds points only.
    id               str, optional: the record's scene_id (default '<file stem>-<line number>')

QAPair.views is every image of the row, in order. Bad rows are skipped and counted by reason in
`SparQa.skipped` (missing files raise: a wrong image root is a setup error, not a bad row).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import records
from data_pipelines.builders.base import JsonlRowsBuilder, RowError
from data_pipelines.scene import QAPair, Scene

_COLOUR_POINTS = ("red", "blue", "green", "yellow")


@dataclasses.dataclass
class SparQaConfig(tfds.core.BuilderConfig):
    """Where the rows are and how to label them."""

    files: tuple[tuple[str, str], ...] = ()  # (split, jsonl path); () = every <split>.jsonl in manual_dir
    dataset: str = "spar"
    z_far: float = 80.0  # the official pipeline uses 80 m for every SPAR source
    normal_loss: bool = False  # 'spar' is not in the official normal-loss dataset lists
    depth_scale: float = 0.001
    image_format: str = "jpeg"


def _matrices(value, size: int, count: int, what: str) -> np.ndarray:
    """One matrix (3x3, 4x4 or flat) or a list of `count` of them -> float64[count, size, size]."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.size in (9, 16):  # one matrix shared by every view
        arr = np.broadcast_to(arr.reshape(1, -1), (count, arr.size))
    elif arr.size in (9 * count, 16 * count):
        arr = arr.reshape(count, -1)
    else:
        raise RowError("bad_camera", f"{what} must be 3x3, 4x4 or a list of {count} of them")
    side = 3 if arr.shape[1] == 9 else 4
    if side < size:
        raise RowError("bad_camera", f"{what} is {side}x{side}, need {size}x{size}")
    return arr.reshape(count, side, side)[:, :size, :size]


def _answer_type(row: dict) -> str:
    if "answer_type" in row:
        if row["answer_type"] not in ("numeric", "choice"):
            raise RowError("bad_answer_type", f"answer_type {row['answer_type']!r}")
        return row["answer_type"]
    answer = str(row["answer"]).strip()
    if re.fullmatch(r"[A-F]", answer):
        return "choice"
    try:
        float(answer)
        return "numeric"
    except ValueError:
        raise RowError("bad_answer_type", f"cannot infer answer_type of {answer!r}") from None


def _metadata(row: dict) -> dict:
    meta = row.get("metadata") or {}
    try:
        meta = json.loads(meta) if isinstance(meta, str) else meta
    except json.JSONDecodeError:
        raise RowError("bad_metadata", "metadata is neither a dict nor JSON text") from None
    if not isinstance(meta, dict):
        raise RowError("bad_metadata", "metadata is not a dict")
    if any(k.endswith("_bbox") for k in meta):
        raise RowError("bbox_markers", "box markers are not representable as QAPair point markers")
    return meta


def _markers(row: dict, meta: dict, factors: list[tuple[float, float]], sizes: list[tuple[int, int]]):
    """Row markers (source pixels) or official metadata points (0..1000) -> markers in stored pixels,
    pixel centres at integers."""
    out = []
    try:
        for view, u, v, label in row.get("markers", []):
            sx, sy = factors[int(view)]
            out.append((int(view), (float(u) + 0.5) * sx - 0.5, (float(v) + 0.5) * sy - 0.5, str(label)))
        if not out:
            views = meta.get("point_img_idx", [[]])[0]
            for n, colour in enumerate(c for c in _COLOUR_POINTS if f"{c}_point" in meta):
                x, y = meta[f"{colour}_point"][0]
                view = int(views[n]) if n < len(views) else 0
                h, w = sizes[view]
                out.append((view, x / 1000 * w - 0.5, y / 1000 * h - 0.5, colour))
    except (IndexError, TypeError, ValueError) as e:
        raise RowError("bad_marker", str(e)) from None
    return tuple(out)


def _load_view(root: pathlib.Path, image_path: str, depth_path: str, scale: float):
    """-> (image uint8[H, W, 3] at depth size, depth float32[H, W], image resize factors (sx, sy))."""
    with Image.open(root / depth_path) as im:
        units = np.asarray(im)
    with Image.open(root / image_path) as im:
        rgb = im.convert("RGB")
        factors = (units.shape[1] / rgb.size[0], units.shape[0] / rgb.size[1])
        if rgb.size != (units.shape[1], units.shape[0]):
            rgb = rgb.resize((units.shape[1], units.shape[0]), Image.Resampling.LANCZOS)
        image = np.asarray(rgb, dtype=np.uint8)
    return image, units.astype(np.float32) * np.float32(scale), factors


def _intrinsics(row: dict, n: int, resized: list[bool]) -> np.ndarray:
    """float64[n, 3, 3]: depth_intrinsic for views whose image was resized to the depth size."""
    if any(resized) and "depth_intrinsic" not in row:
        raise RowError("missing_field", "depth and image sizes differ but the row has no depth_intrinsic")
    k_img = _matrices(row["intrinsic"], 3, n, "intrinsic")
    k_depth = _matrices(row["depth_intrinsic"], 3, n, "depth_intrinsic") if "depth_intrinsic" in row else k_img
    return np.stack([k_depth[v] if resized[v] else k_img[v] for v in range(n)])


def row_to_scene(row: dict, root: pathlib.Path, row_id: str, cfg: SparQaConfig) -> Scene:
    """One jsonl row -> a Scene with one QAPair; raises RowError (skip the row) or OSError (missing file)."""
    missing = [k for k in ("image_list", "depth_list", "poses", "intrinsic", "question", "answer") if k not in row]
    if missing:
        raise RowError("missing_field", f"row lacks {missing}")
    n = len(row["image_list"])
    if n == 0 or len(row["depth_list"]) != n:
        raise RowError("view_count_mismatch", f"{n} images, {len(row['depth_list'])} depth maps")
    answer_type, meta = _answer_type(row), _metadata(row)  # cheap checks before reading any image
    c2w = _matrices(row["poses"], 4, n, "poses")
    scale = float(row.get("depth_scale", cfg.depth_scale))
    views = [_load_view(root, i, d, scale) for i, d in zip(row["image_list"], row["depth_list"])]
    sizes = [v[1].shape for v in views]
    if len(set(sizes)) != 1:
        raise RowError("view_size_mismatch", f"depth sizes {sorted(set(sizes))}")
    factors = [v[2] for v in views]
    intrinsics = _intrinsics(row, n, [f != (1.0, 1.0) for f in factors])
    qa = QAPair(question=str(row["question"]), answer=str(row["answer"]).strip(), answer_type=answer_type,
                task=str(row.get("task") or meta.get("type") or "spar"),
                choices=tuple(str(c) for c in row.get("choices", ())), views=tuple(range(n)),
                markers=_markers(row, meta, factors, sizes))
    return Scene(scene_id=str(row.get("id", row_id)), dataset=cfg.dataset, images=np.stack([v[0] for v in views]),
                 depth=np.stack([v[1] for v in views]), intrinsics=intrinsics.astype(np.float32),
                 c2w=c2w.astype(np.float32), z_far=cfg.z_far, normal_loss=cfg.normal_loss, qa=(qa,))


class SparQa(JsonlRowsBuilder):
    """SPAR-style spatial QA: each jsonl row (images, depth, poses, question, answer) is one record."""

    CONFIG_CLASS = SparQaConfig
    ROW_KIND = "spar"
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass the folder that image/depth paths are relative to as manual_dir; "
                                    "rows come from <split>.jsonl there or from SparQaConfig.files.")

    def row_to_record(self, row: dict, root: pathlib.Path, row_id: str) -> dict:
        cfg = self.settings
        scene = row_to_scene(row, root, row_id, cfg)
        return records.scene_to_record(scene, image_format=cfg.image_format, depth_codec="png16",
                                       depth_scale=float(row.get("depth_scale", cfg.depth_scale)))
