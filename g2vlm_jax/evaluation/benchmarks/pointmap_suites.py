"""Point-map suites: 7-Scenes, NRGBD and ETH3D as the π³ / G²VLM papers evaluate multi-view reconstruction
(π³ repo yyfz/Pi3, branch `evaluation`: mv_recon/eval.py, configs/data/mv_recon.yaml, datasets/*.py;
the protocol of Spann3R / CUT3R). docs/BENCHMARKS.md lists every choice and its source.

One unit = one sequence. Its keyframes (every `keyframe_every`-th frame from frame 0) go through one
forward pass; the GT point map is unprojected from the GT depth (resized to the prediction's size by
nearest neighbour, intrinsics scaled with it) with the dataset's c2w poses in OpenCV axes; valid
pixels are the dataset's depth range. Scoring is `metrics.pointmap.pointmap_metrics` on the valid
points as an unstructured cloud (normals by PCA of 30 neighbours, as Open3D's estimate_normals in the
reference), Umeyama Sim(3) then point-to-point ICP with a 0.1 m threshold. The table is the mean over
sequences of each metric (the reference divides the sums by the number of sequences).
"""
from __future__ import annotations

import abc
import dataclasses
import pathlib
import re

import numpy as np

from g2vlm_jax import geometry
from g2vlm_jax.evaluation.benchmarks import formats
from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError, Predictor, Suite
from g2vlm_jax.metrics import pointmap

ICP_THRESHOLD = 0.1  # metres: the reference's ICP correspondence distance for every suite but DTU
MAX_POINTS = 100_000  # scored points per sequence (pointmap_metrics' deterministic subsample; see BENCHMARKS.md)
ALIGN = "umeyama_icp"


@dataclasses.dataclass(frozen=True)
class Frame:
    """One GT view: image uint8[H, W, 3], depth float64[H, W] metres (invalid <= 0 or non-finite),
    intrinsics [3, 3] of that size, c2w [4, 4] camera-to-world in OpenCV axes (x right, y down, z forward)."""

    image: np.ndarray
    depth: np.ndarray
    intrinsics: np.ndarray
    c2w: np.ndarray


class PointMapDataset(abc.ABC):
    """A dataset's on-disk layout: its sequences, their frame counts and frames."""

    min_depth: float = 1e-4  # metres; the reference's valid mask is depth > 1e-4 ...
    max_depth: float = np.inf  # ... after each dataset's own range filter

    @abc.abstractmethod
    def sequences(self, root: pathlib.Path) -> list[str]:
        """Sorted sequence names of the evaluation split."""

    @abc.abstractmethod
    def num_frames(self, root: pathlib.Path, sequence: str) -> int:
        """Frames of `sequence` (numbered 0..n-1)."""

    @abc.abstractmethod
    def frame(self, root: pathlib.Path, sequence: str, index: int) -> Frame:
        """Frame `index` of `sequence`."""

    def valid(self, depth: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.isfinite(depth) & (depth > self.min_depth) & (depth <= self.max_depth)


def _same_size(image: np.ndarray, depth: np.ndarray, image_path: pathlib.Path, depth_path: pathlib.Path) -> None:
    if image.shape[:2] != depth.shape:
        raise DatasetLayoutError(f"{image_path} is {image.shape[1]}x{image.shape[0]} but its depth {depth_path} is "
                                 f"{depth.shape[1]}x{depth.shape[0]}; the layout pairs an image with a depth map of "
                                 "its size")


def _numbered(folder: pathlib.Path, pattern: str, what: str) -> int:
    """Count of files matching `pattern` (one group: the frame number) in `folder`, checked to be 0..n-1."""
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder} is missing: expected a folder of {what} (layout: docs/BENCHMARKS.md)")
    numbers = sorted(int(m.group(1)) for m in (re.fullmatch(pattern, p.name) for p in folder.iterdir()) if m)
    if not numbers:
        raise DatasetLayoutError(f"{folder} holds no {what} (file names like {pattern})")
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))[:3]
        raise DatasetLayoutError(f"{folder}: {what} must be numbered 0..{len(numbers) - 1} without gaps; "
                                 f"frame(s) {missing} are missing")
    return len(numbers)


class SevenScenes(PointMapDataset):
    """Microsoft 7-Scenes: ROOT/<scene>/TestSplit.txt ('sequence2' lines) and ROOT/<scene>/seq-02/
    frame-000000.color.png, frame-000000.depth.proj.png (the registered depth Spann3R / π³ evaluate; the raw
    frame-000000.depth.png when no .proj exists), frame-000000.pose.txt (camera-to-world 4x4). Depth:
    uint16 millimetres, 65535 = invalid; the reference keeps (1 mm, 10 m]. Intrinsics: fx = fy = 525,
    (cx, cy) = (320, 240) at 640x480 (the reference's fixed values)."""

    min_depth, max_depth = 1e-3, 10.0
    intrinsics = np.array([[525.0, 0, 320.0], [0, 525.0, 240.0], [0, 0, 1]])

    def sequences(self, root):
        splits = sorted(root.glob("*/TestSplit.txt"))
        if not splits:
            raise DatasetLayoutError(f"{root} holds no <scene>/TestSplit.txt; point --data at the 7-Scenes folder "
                                     "holding chess/, fire/, heads/, ... as released")
        out = []
        for split in splits:
            for line in split.read_text().split():
                match = re.fullmatch(r"sequence(\d+)", line.strip())
                if not match:
                    raise DatasetLayoutError(f"{split}: line {line!r} is not 'sequenceN'")
                out.append(f"{split.parent.name}/seq-{int(match.group(1)):02d}")
        return sorted(out)

    def num_frames(self, root, sequence):
        return _numbered(root / sequence, r"frame-(\d{6})\.color\.png", "frame-NNNNNN.color.png images")

    def frame(self, root, sequence, index):
        stem = root / sequence / f"frame-{index:06d}"
        image_path = stem.with_name(stem.name + ".color.png")
        depth_path = stem.with_name(stem.name + ".depth.proj.png")
        if not depth_path.exists():
            depth_path = stem.with_name(stem.name + ".depth.png")
        image = formats.read_rgb(image_path)
        raw = formats.read_png_depth(depth_path, 1.0)
        depth = np.where(raw == 65535, 0.0, raw / 1000.0)
        _same_size(image, depth, image_path, depth_path)
        c2w = formats.read_matrix_txt(stem.with_name(stem.name + ".pose.txt"))
        k = formats.scale_intrinsics(self.intrinsics, (480, 640), depth.shape)
        return Frame(image, depth, k, c2w)


class NeuralRGBD(PointMapDataset):
    """Neural RGB-D synthetic scenes: ROOT/<scene>/images/img0.png.., depth/depth0.png.. (uint16 mm) and
    poses.txt (one 4x4 camera-to-world matrix per frame, 4 lines each, OpenGL/NeRF axes: y up, z backward;
    converted to OpenCV by negating the y and z columns). A frame whose pose is NaN has no GT points.
    Intrinsics: fx = fy = 554.2562584220408, (cx, cy) = (320, 240) at 640x480 (the reference's values)."""

    min_depth, max_depth = 1e-3, 10.0
    intrinsics = np.array([[554.2562584220408, 0, 320.0], [0, 554.2562584220408, 240.0], [0, 0, 1]])

    def sequences(self, root):
        scenes = sorted(p.parent.name for p in root.glob("*/poses.txt"))
        if not scenes:
            raise DatasetLayoutError(f"{root} holds no <scene>/poses.txt; point --data at the NRGBD folder holding "
                                     "breakfast_room/, complete_kitchen/, ... as released")
        return scenes

    def _poses(self, root, sequence) -> np.ndarray:
        values = formats.read_matrix_txt(root / sequence / "poses.txt", rows=None)
        poses = values.reshape(-1, 4, 4).copy()
        poses[:, :, 1:3] *= -1.0  # OpenGL camera axes -> OpenCV
        return poses

    def num_frames(self, root, sequence):
        n = _numbered(root / sequence / "images", r"img(\d+)\.png", "imgN.png images")
        poses = len(self._poses(root, sequence))
        if poses != n:
            raise DatasetLayoutError(f"{root / sequence / 'poses.txt'} holds {poses} poses for {n} images; expected "
                                     "one 4x4 matrix per image")
        return n

    def frame(self, root, sequence, index):
        image_path = root / sequence / "images" / f"img{index}.png"
        depth_path = root / sequence / "depth" / f"depth{index}.png"
        image, depth = formats.read_rgb(image_path), formats.read_png_depth(depth_path, 1000.0)
        _same_size(image, depth, image_path, depth_path)
        k = formats.scale_intrinsics(self.intrinsics, (480, 640), depth.shape)
        return Frame(image, depth, k, self._poses(root, sequence)[index])


class ETH3D(PointMapDataset):
    """ETH3D high-res multi-view (training scenes) in the layout π³'s datasets/preprocess/prepare_eth3d.py writes
    from the released DSLR JPGs, depth and calibration: ROOT/<scene>/images/custom_undistorted/DSC_NNNN.JPG,
    ground_truth_depth/custom_undistorted/DSC_NNNN.JPG (headerless float32 depth at the image size, 0 / inf =
    none), custom_undistorted_cam/DSC_NNNN.npz (`intrinsics` [3,3], `extrinsics` world-to-camera [4,4],
    COLMAP/OpenCV axes). Frames in file-name order."""

    def sequences(self, root):
        scenes = sorted(p.parent.parent.name for p in root.glob("*/images/custom_undistorted"))
        if not scenes:
            raise DatasetLayoutError(f"{root} holds no <scene>/images/custom_undistorted/; lay ETH3D out as "
                                     "π³'s prepare_eth3d.py writes it (docs/BENCHMARKS.md)")
        return scenes

    def _names(self, root, sequence) -> list[str]:
        folder = root / sequence / "images" / "custom_undistorted"
        names = sorted(p.name for p in folder.iterdir() if p.suffix == ".JPG")
        if not names:
            raise DatasetLayoutError(f"{folder} holds no .JPG images")
        return names

    def num_frames(self, root, sequence):
        return len(self._names(root, sequence))

    def frame(self, root, sequence, index):
        name = self._names(root, sequence)[index]
        image = formats.read_rgb(root / sequence / "images" / "custom_undistorted" / name)
        depth_path = root / sequence / "ground_truth_depth" / "custom_undistorted" / name
        depth = formats.read_raw_float_depth(depth_path, *image.shape[:2])
        cam_path = formats.require_file(root / sequence / "custom_undistorted_cam" / (name[:-4] + ".npz"),
                                        "the camera npz (intrinsics, extrinsics) of " + name)
        try:
            with np.load(cam_path, allow_pickle=False) as cam:
                k, w2c = np.asarray(cam["intrinsics"], np.float64), np.asarray(cam["extrinsics"], np.float64)
        except (KeyError, ValueError, OSError) as e:
            raise DatasetLayoutError(f"{cam_path} is not an npz with 'intrinsics' and 'extrinsics' ({e})") from None
        if k.shape != (3, 3) or w2c.shape not in ((4, 4), (3, 4)):
            raise DatasetLayoutError(f"{cam_path}: intrinsics {k.shape} / extrinsics {w2c.shape}; expected [3,3] / [4,4]")
        w2c = np.vstack([w2c[:3], [0, 0, 0, 1]])
        return Frame(image, depth, k, geometry.se3_inverse(w2c))


class PointMapSuite(Suite):
    """Multi-view point-map reconstruction of one dataset with one keyframe stride."""

    kind = "pointmap"
    columns = ("acc", "acc_med", "comp", "comp_med", "nc", "nc_med")

    def __init__(self, name: str, label: str, dataset: PointMapDataset, keyframe_every: int, source: str):
        self.name, self.label, self.dataset, self.keyframe_every, self.source = (name, label, dataset,
                                                                                 keyframe_every, source)

    def protocol(self) -> dict:
        return {"keyframe_every": self.keyframe_every, "align": ALIGN, "icp_threshold_m": ICP_THRESHOLD,
                "normals": "pca_30_neighbours", "max_points": MAX_POINTS,
                "depth_range_m": [self.dataset.min_depth, None if np.isinf(self.dataset.max_depth) else
                                  self.dataset.max_depth], "average": "mean over sequences"}

    def units(self, data_dir):
        return self.dataset.sequences(pathlib.Path(data_dir))

    def ground_truth(self, frame: Frame, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """GT world points float64[h, w, 3] and valid bool[h, w] of one frame at the prediction's size (h, w)."""
        depth = formats.resize_depth_nearest(frame.depth, size)
        k = formats.scale_intrinsics(frame.intrinsics, frame.depth.shape, size)
        ok = self.dataset.valid(depth)
        points = geometry.depth_to_world_points(np.where(ok, depth, 0.0), k, frame.c2w)
        return points, ok & np.isfinite(points).all(-1)

    def evaluate(self, predictor: Predictor, data_dir, unit):
        root = pathlib.Path(data_dir)
        ids = list(range(0, self.dataset.num_frames(root, unit), self.keyframe_every))
        images, gt, valid, size = [], [], [], None
        for i in ids:  # full-size GT depth is dropped frame by frame (ETH3D frames are 24 Mpixel)
            frame = self.dataset.frame(root, unit, i)
            size = size or predictor.input_size(*frame.depth.shape)
            points, ok = self.ground_truth(frame, size)
            images.append(frame.image), gt.append(points), valid.append(ok)
        pred = np.asarray(predictor.reconstruct(images)["world_points"], np.float64)
        if pred.shape[1:3] != tuple(size):
            raise ValueError(f"the predictor returned {pred.shape[1:3]} point maps for input size {size}")
        gt, valid = np.stack(gt), np.stack(valid)
        scores = pointmap.pointmap_metrics(pred[valid], gt[valid], align=ALIGN, icp_threshold=ICP_THRESHOLD,
                                           max_points=MAX_POINTS)
        return [{"unit": unit, "frames": ids, **scores}]

    def summarize(self, rows):
        return {self.label: {c: float(np.mean([r[c] for r in rows])) for c in self.columns}}


SOURCE = "yyfz/Pi3@evaluation: mv_recon/eval.py, configs/data/mv_recon.yaml, datasets/{sevenscenes,nrgbd,eth3d}.py"
SUITES = (
    PointMapSuite("7scenes-sparse", "7-Scenes (sparse, every 200th frame)", SevenScenes(), 200, SOURCE),
    PointMapSuite("7scenes-dense", "7-Scenes (dense, every 40th frame)", SevenScenes(), 40, SOURCE),
    PointMapSuite("nrgbd-sparse", "NRGBD (sparse, every 500th frame)", NeuralRGBD(), 500, SOURCE),
    PointMapSuite("nrgbd-dense", "NRGBD (dense, every 100th frame)", NeuralRGBD(), 100, SOURCE),
    PointMapSuite("eth3d", "ETH3D (every 5th image)", ETH3D(), 5, SOURCE),
)
