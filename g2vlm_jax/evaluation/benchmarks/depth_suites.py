"""Depth suites: Sintel, Bonn, KITTI and NYU-v2 as π³ evaluates monocular and video depth (yyfz/Pi3, branch
`evaluation`: monodepth/eval.py, videodepth/eval.py, utils/depth.py, configs/data/depth.yaml; the CUT3R /
MonST3R protocol). docs/BENCHMARKS.md lists every choice and its source.

Monocular (`*-mono`): every frame alone through the model; its depth (local z) is resized bicubically to
the GT size and aligned to the GT by one scale per frame (the L1-optimal scale by 10 IRLS steps of
`metrics.depth`, the reference's `align_with_scale`). Video (`*-video`): each sequence in one forward
pass and one scale and shift for the whole sequence, fitted as the reference's "scale&shift" does
(`lad_scale_shift`: 1000 Adam steps on the L1 loss from the median scale). The table is AbsRel and δ<1.25 averaged over frames
(mono) or sequences (video) weighted by valid GT pixels (`aggregate_depth_metrics`), as the reference.
One unit = one sequence (NYU-v2, a set of single images: a chunk of `NYU_CHUNK` images).
"""
from __future__ import annotations

import abc
import pathlib

import numpy as np

from g2vlm_jax.evaluation.benchmarks import formats
from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError, Predictor, Suite
from g2vlm_jax.metrics import depth as depth_metrics_lib

SINTEL_SEQUENCES = ("alley_2", "ambush_4", "ambush_5", "ambush_6", "cave_2", "cave_4", "market_2", "market_5",
                    "market_6", "shaman_3", "sleeping_1", "sleeping_2", "temple_2", "temple_3")
BONN_SEQUENCES = ("rgbd_bonn_balloon2", "rgbd_bonn_crowd2", "rgbd_bonn_crowd3", "rgbd_bonn_person_tracking2",
                  "rgbd_bonn_synchronous")
NYU_CHUNK = 100  # NYU-v2 images per unit (654 test images -> 7 units)


def _files(folder: pathlib.Path, suffix: str, what: str) -> list[pathlib.Path]:
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder} is missing: expected a folder of {what} (layout: docs/BENCHMARKS.md)")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(suffix))
    if not files:
        raise DatasetLayoutError(f"{folder} holds no {what} (*{suffix})")
    return files


def _pairs(images: list[pathlib.Path], depths: list[pathlib.Path]) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(image, depth) pairs in sorted order, as the reference pairs them; the counts must agree."""
    if len(images) != len(depths):
        raise DatasetLayoutError(f"{images[0].parent} holds {len(images)} images but {depths[0].parent} holds "
                                 f"{len(depths)} depth maps; every image needs its depth map")
    return list(zip(images, depths))


class DepthDataset(abc.ABC):
    """A dataset's layout: sequences, their (image, depth) file pairs and the depth reader."""

    label: str
    max_depth: float | None = None  # metres: GT beyond it is not scored and aligned predictions are clipped to it

    @abc.abstractmethod
    def sequences(self, root: pathlib.Path) -> list[str]:
        """Sorted sequence names."""

    @abc.abstractmethod
    def pairs(self, root: pathlib.Path, sequence: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
        """(image file, GT depth file) of every frame of `sequence`, in frame order."""

    @abc.abstractmethod
    def read_depth(self, path: pathlib.Path) -> np.ndarray:
        """GT depth float64[H, W] metres; <= 0 / non-finite = no value."""

    def _require(self, root: pathlib.Path, names: tuple[str, ...], where: str) -> list[str]:
        missing = [n for n in names if not (root / where.format(seq=n)).is_dir()]
        if missing:
            raise DatasetLayoutError(f"{root / where.format(seq=missing[0])} is missing ({len(missing)} of the "
                                     f"{len(names)} evaluation sequences are): the protocol scores all of them; "
                                     "docs/BENCHMARKS.md shows the layout --data must have")
        return sorted(names)


class Sintel(DepthDataset):
    """MPI-Sintel training set: ROOT/final/<seq>/frame_0001.png (MPI-Sintel-complete) and
    ROOT/depth/<seq>/frame_0001.dpt (MPI-Sintel-depth-training); the 14 sequences of the reference."""

    label, max_depth = "Sintel", 70.0

    def sequences(self, root):
        return self._require(root, SINTEL_SEQUENCES, "final/{seq}")

    def pairs(self, root, sequence):
        return _pairs(_files(root / "final" / sequence, ".png", "Sintel final-pass frames"),
                      _files(root / "depth" / sequence, ".dpt", "Sintel .dpt depth files"))

    def read_depth(self, path):
        return formats.read_sintel_dpt(path)


class Bonn(DepthDataset):
    """Bonn RGB-D dynamic: ROOT/<seq>/rgb_110/*.png and depth_110/*.png (uint16, 5000 per metre), the 110
    frames per sequence the MonST3R / CUT3R / π³ preparation copies from the released rgb/ and depth/."""

    label, max_depth = "Bonn", 70.0

    def sequences(self, root):
        return self._require(root, BONN_SEQUENCES, "{seq}/rgb_110")

    def pairs(self, root, sequence):
        return _pairs(_files(root / sequence / "rgb_110", ".png", "Bonn RGB frames"),
                      _files(root / sequence / "depth_110", ".png", "Bonn depth PNGs"))

    def read_depth(self, path):
        return formats.read_png_depth(path, 5000.0)


class Kitti(DepthDataset):
    """KITTI depth-selection validation (cropped 1216x352): ROOT/image_gathered/<drive>/*.png and
    ROOT/groundtruth_depth_gathered/<drive>/*.png (uint16, 256 per metre, 0 = no LiDAR point): the released
    val_selection_cropped files gathered per drive as MonST3R / CUT3R / π³ prepare them."""

    label = "KITTI"

    def sequences(self, root):
        folder = root / "image_gathered"
        if not folder.is_dir():
            raise DatasetLayoutError(f"{folder} is missing: point --data at depth_selection/val_selection_cropped "
                                     "holding image_gathered/ and groundtruth_depth_gathered/")
        return sorted(p.name for p in folder.iterdir() if p.is_dir())

    def pairs(self, root, sequence):
        return _pairs(_files(root / "image_gathered" / sequence, ".png", "KITTI images"),
                      _files(root / "groundtruth_depth_gathered" / sequence, ".png", "KITTI depth PNGs"))

    def read_depth(self, path):
        return formats.read_png_depth(path, 256.0)


class NYUv2(DepthDataset):
    """NYU-v2 labelled test split (654 images) extracted as the reference reads it: ROOT/nyu_images/*.png and
    ROOT/nyu_depths/*.npy (float depth in metres); units are chunks of NYU_CHUNK images in file order."""

    label = "NYU-v2"

    def _all_pairs(self, root):
        return _pairs(_files(root / "nyu_images", ".png", "NYU-v2 images"),
                      _files(root / "nyu_depths", ".npy", "NYU-v2 .npy depth maps"))

    def sequences(self, root):
        n = len(self._all_pairs(root))
        return [f"images-{i:04d}-{min(i + NYU_CHUNK, n) - 1:04d}" for i in range(0, n, NYU_CHUNK)]

    def pairs(self, root, sequence):
        first, last = (int(x) for x in sequence.split("-")[1:])
        return self._all_pairs(root)[first:last + 1]

    def read_depth(self, path):
        return formats.read_npy_depth(path)


class DepthSuite(Suite):
    """Monocular ('mono') or video ('video') depth of one dataset."""

    kind = "depth"
    columns = ("abs_rel", "delta_1.25")

    def __init__(self, dataset: DepthDataset, mode: str, source: str):
        if mode not in ("mono", "video"):
            raise ValueError(f"DepthSuite mode must be 'mono' or 'video', got {mode!r}")
        self.dataset, self.mode, self.source = dataset, mode, source
        self.name = f"{dataset.label.lower()}-{mode}"
        self.align = "l1_scale" if mode == "mono" else "lad_scale_shift"

    def protocol(self) -> dict:
        return {"mode": self.mode, "align": self.align, "max_depth_m": self.dataset.max_depth,
                "prediction_resize": "bicubic to the GT size",
                "average": "valid-pixel weighted over " + ("frames" if self.mode == "mono" else "sequences")}

    def units(self, data_dir):
        return self.dataset.sequences(pathlib.Path(data_dir))

    def _frames(self, root: pathlib.Path, unit: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(image name, image uint8[H, W, 3], GT depth [H, W]) of every frame of `unit`."""
        out = []
        for image_path, depth_path in self.dataset.pairs(root, unit):
            image, gt = formats.read_rgb(image_path), self.dataset.read_depth(depth_path)
            if image.shape[:2] != gt.shape:
                raise DatasetLayoutError(f"{image_path} is {image.shape[1]}x{image.shape[0]} but its depth "
                                         f"{depth_path} is {gt.shape[1]}x{gt.shape[0]}")
            out.append((image_path.name, image, gt))
        return out

    def _score(self, pred: np.ndarray, gt: np.ndarray) -> dict:
        return depth_metrics_lib.depth_metrics(pred, gt, align=self.align, max_depth=self.dataset.max_depth)

    def evaluate(self, predictor: Predictor, data_dir, unit):
        frames = self._frames(pathlib.Path(data_dir), unit)
        if self.mode == "mono":
            rows = []
            for name, image, gt in frames:
                depth = predictor.reconstruct([image])["local_points"][0, ..., 2]
                rows.append({"unit": unit, "frame": name,
                             **self._score(formats.resize_depth_bicubic(depth, gt.shape), gt)})
            return rows
        depth = predictor.reconstruct([image for _, image, _ in frames])["local_points"][..., 2]
        pred = np.concatenate([formats.resize_depth_bicubic(d, gt.shape) for d, (_, _, gt) in zip(depth, frames)])
        gt = np.concatenate([gt for _, _, gt in frames])  # [V*H, W]: one alignment for the whole sequence
        return [{"unit": unit, "frames": len(frames), **self._score(pred, gt)}]

    def summarize(self, rows):
        total = depth_metrics_lib.aggregate_depth_metrics(rows)
        return {f"{self.dataset.label} ({self.mode})": {c: total[c] for c in self.columns}}


SOURCE = ("yyfz/Pi3@evaluation: monodepth/eval.py, videodepth/eval.py, utils/depth.py (from CUT3R "
          "eval/monodepth), configs/data/depth.yaml")
SUITES = (
    DepthSuite(Sintel(), "mono", SOURCE), DepthSuite(Bonn(), "mono", SOURCE), DepthSuite(Kitti(), "mono", SOURCE),
    DepthSuite(NYUv2(), "mono", SOURCE),
    DepthSuite(Sintel(), "video", SOURCE), DepthSuite(Bonn(), "video", SOURCE), DepthSuite(Kitti(), "video", SOURCE),
)
