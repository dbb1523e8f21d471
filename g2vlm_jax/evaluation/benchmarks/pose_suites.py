"""Camera-pose benchmarks: Co3Dv2, RealEstate10K, TUM-dynamics and ScanNet, read in their released
(or, for the video-pose sets, π³'s prepared) layouts and scored as VGGT / π³ score them
(docs/BENCHMARKS.md, "Camera pose").

Every suite feeds the sampled frames of one sequence to `predictor.reconstruct` in one pass and
scores the predicted camera-to-world poses against the ground truth with
`metrics.pose.relative_pose_metrics` over all frame pairs i < j (rotation / translation angle of
the relative poses; RRA@τ, RTA@τ, AUC@τ for τ in 5, 15, 30 degrees). A unit is one sequence and
gives one row; the table pools the pairs of all sequences (`aggregate_pose_metrics`), as π³'s
eval_angle.py concatenates the per-pair errors of all sequences before taking the metrics. The
video-pose suites (TUM-dynamics, ScanNet) add π³'s trajectory columns ATE / RPE-trans / RPE-rot
(`metrics.pose.trajectory_metrics`), averaged over sequences as π³'s eval_dist.py does.

Co3Dv2 / RealEstate10K frame sampling follows π³'s relpose/sampling.py: one legacy NumPy RandomState seeded with 42 draws
`choice(num_frames_of_sequence, 10, replace=False)` for every sequence in the dataset's order,
skipping sequences shorter than 10 frames. Because the draws are sequential, the plan of the whole
dataset is computed once per process (cached) and each unit looks its frames up in it; the plan
depends only on the annotation files, so every process of a multi-process run gets the same plan.
TUM-dynamics / ScanNet use all 90 frames of MonST3R's preparation in one pass, as π³ does.

Poses are OpenCV camera-to-world float64[4, 4] (x right, y down, z forward) throughout.
"""
from __future__ import annotations

import abc
import functools
import gzip
import json
import pathlib

import numpy as np

from g2vlm_jax import geometry
from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError, Predictor, Suite
from g2vlm_jax.evaluation.benchmarks.formats import read_rgb
from g2vlm_jax.metrics import pose as pose_metrics

SAMPLING_SEED = 42          # π³ configs/evaluation/relpose-angular.yaml
FRAMES_PER_SEQUENCE = 10    # VGGT test_co3d.py --num_frames / π³ relpose-angular.yaml num_frames
THRESHOLDS = (5, 15, 30)    # degrees; π³ metric_thresholds, VGGT reports AUC@30 (and @5/@15)
POSE_COLUMNS = ("RRA@30", "RTA@30", "AUC@30", "AUC@15", "AUC@5", "pairs", "sequences")
CO3D_CATEGORY_MEAN = "AUC@30 category mean (VGGT)"
TRAJECTORY_COLUMNS = ("ATE", "RPE-trans", "RPE-rot") + POSE_COLUMNS  # π³ / MonST3R video-pose tables first

# The 41 "seen" Co3Dv2 categories of RelPose++ / PoseDiffusion / VGGT / π³ (π³ datasets/co3d_v2.py
# TRAINING_CATEGORIES, in that order: the order decides which random draws each sequence gets).
CO3D_CATEGORIES = (
    "apple", "backpack", "banana", "baseballbat", "baseballglove", "bench", "bicycle", "bottle",
    "bowl", "broccoli", "cake", "car", "carrot", "cellphone", "chair", "cup", "donut", "hairdryer",
    "handbag", "hydrant", "keyboard", "laptop", "microwave", "motorcycle", "mouse", "orange",
    "parkingmeter", "pizza", "plant", "stopsign", "teddybear", "toaster", "toilet", "toybus",
    "toyplane", "toytrain", "toytruck", "tv", "umbrella", "vase", "wineglass",
)
CO3D_SET_LIST = "set_lists/set_lists_fewview_dev.json"  # VGGT preprocess_co3d.py reads this split
CO3D_MIN_QUALITY = 0.5       # sequence viewpoint_quality_score must exceed it (VGGT preprocess_co3d.py)
CO3D_MIN_FRAMES = 50         # shorter test sequences are left out (VGGT / π³ min_num_images)
CO3D_MAX_TRANSLATION_SUM = 1e5  # a sequence with T[0]+T[1]+T[2] above it is broken (VGGT / π³)

TUM_MAX_TIME_DIFFERENCE = 0.02  # seconds; MonST3R prepare_tum.py (TUM associate.py default)
TUM_STRIDE = 3                  # MonST3R prepare_tum.py "rgb_90": every 3rd associated frame ...
TUM_FRAMES = 90                 # ... the first 90 of them


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def _read_json(path: pathlib.Path, gz: bool = False):
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: file not found; see docs/BENCHMARKS.md for the layout this suite reads")
    try:
        with (gzip.open(path, "rt") if gz else open(path)) as f:
            return json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        kind = "gzip-compressed JSON" if gz else "JSON"
        raise DatasetLayoutError(f"{path}: not valid {kind} ({e}); re-download or re-extract it") from e


def legacy_sampling_plan(frame_counts: list[tuple[str, int]], num_frames: int = FRAMES_PER_SEQUENCE,
                         seed: int = SAMPLING_SEED) -> dict[str, list[int]]:
    """π³ relpose/sampling.py: {sequence: frame ids} from one RandomState(seed) drawing
    choice(n, num_frames, replace=False) per sequence in the given order; sequences with
    n < num_frames are left out (and draw nothing)."""
    rng = np.random.RandomState(seed)
    plan = {}
    for name, count in frame_counts:
        if count < num_frames:
            continue
        plan[name] = [int(i) for i in rng.choice(count, num_frames, replace=False)]
    return plan


# --------------------------------------------------------------------------------------------------
# Conventions
# --------------------------------------------------------------------------------------------------
def pytorch3d_to_opencv_c2w(r, t) -> np.ndarray:
    """Co3D viewpoint (R, T) in PyTorch3D's convention -> OpenCV camera-to-world float64[4, 4].

    PyTorch3D maps a world point as a row vector, X_cam = X_world · R + T, with camera axes
    x left, y up, z forward. Its world-to-camera matrix for column vectors is therefore (Rᵀ, T);
    flipping x and y (F = diag(-1, -1, 1)) gives OpenCV's w2c = (F·Rᵀ, F·T), inverted here.
    """
    r, t = np.asarray(r, dtype=np.float64), np.asarray(t, dtype=np.float64)
    if r.shape != (3, 3) or t.shape != (3,):
        raise ValueError(f"viewpoint R must be 3x3 and T 3 values, got {r.shape} and {t.shape}")
    flip = np.diag([-1.0, -1.0, 1.0])
    w2c = np.eye(4)
    w2c[:3, :3] = flip @ r.T
    w2c[:3, 3] = flip @ t
    return geometry.w2c_to_c2w(w2c)


def tum_pose_to_c2w(values) -> np.ndarray:
    """TUM groundtruth `tx ty tz qx qy qz qw` (pose of the colour camera's optical centre in the
    motion-capture world, i.e. camera-to-world) -> float64[4, 4]."""
    tx, ty, tz, qx, qy, qz, qw = (float(v) for v in values)
    c2w = np.eye(4)
    c2w[:3, :3] = geometry.quaternion_to_matrix(np.array([qw, qx, qy, qz]))
    c2w[:3, 3] = (tx, ty, tz)
    return c2w


# --------------------------------------------------------------------------------------------------
# The common part of the pose suites
# --------------------------------------------------------------------------------------------------
class PoseSuite(Suite):
    """A relative-pose suite: subclasses say how a unit's frames and GT poses are read."""

    kind = "pose"
    columns = POSE_COLUMNS
    trajectory = False  # also ATE / RPE of the whole trajectory (video-pose suites)

    @abc.abstractmethod
    def _frames(self, data_dir: pathlib.Path, unit: str) -> tuple[list[pathlib.Path], np.ndarray, dict]:
        """(image paths [V], GT c2w float64[V, 4, 4], extra row fields) of one unit."""

    def evaluate(self, predictor: Predictor, data_dir: pathlib.Path, unit: str) -> list[dict]:
        paths, gt_c2w, extra = self._frames(pathlib.Path(data_dir), unit)
        images = [read_rgb(p) for p in paths]
        pred_c2w = np.asarray(predictor.reconstruct(images)["c2w"], dtype=np.float64)
        if pred_c2w.shape != gt_c2w.shape:
            raise ValueError(f"{self.name} {unit}: predictor returned c2w {pred_c2w.shape} for {len(paths)} frames")
        if not np.isfinite(pred_c2w).all():
            raise ValueError(f"{self.name} {unit}: predictor returned non-finite camera poses (NaN/inf); "
                             "the model diverged on these frames")
        pred_c2w = pred_c2w.copy()
        # the model's rotations are orthonormal only to float32 precision; the metric wants rotations
        pred_c2w[:, :3, :3] = geometry.nearest_rotation(pred_c2w[:, :3, :3])
        metrics = pose_metrics.relative_pose_metrics(pred_c2w, gt_c2w, THRESHOLDS)
        if self.trajectory:
            metrics.update(pose_metrics.trajectory_metrics(pred_c2w, gt_c2w))
        return [{"unit": unit, "frames": [p.name for p in paths], **extra, **metrics}]

    def protocol(self) -> dict:
        """Settings recorded with every unit result (the runner refuses to mix results of others)."""
        frames = ("all (MonST3R 90-frame preparation)" if self.trajectory
                  else f"{FRAMES_PER_SEQUENCE} random, legacy RandomState({SAMPLING_SEED}) stream over sequences")
        return {"frames": frames, "thresholds_deg": list(THRESHOLDS),
                "pairs": "all i<j, relative pose w2c_j·c2w_i; pooled over sequences",
                **({"trajectory": "Sim(3) Umeyama; RPE delta 1 frame; RMSE; mean over sequences"}
                   if self.trajectory else {})}

    def summarize(self, rows: list[dict]) -> dict[str, dict[str, float]]:
        table = _pooled(rows)
        if self.trajectory:  # π³ eval_dist.py calculate_averages: plain mean over sequences
            table = {"ATE": float(np.mean([r["ate"] for r in rows])),
                     "RPE-trans": float(np.mean([r["rpe_trans"] for r in rows])),
                     "RPE-rot": float(np.mean([r["rpe_rot"] for r in rows])), **table}
        return {self.name: table}


def _pooled(rows: list[dict]) -> dict[str, float]:
    """All pairs of `rows` pooled -> the table's columns (percentages; pairs and sequences counts)."""
    keys = [f"{m}@{t}" for t in THRESHOLDS for m in ("rra", "rta", "auc")] + ["rot_err_mean", "trans_err_mean",
                                                                              "num_pairs"]
    pooled = pose_metrics.aggregate_pose_metrics([{k: r[k] for k in keys} for r in rows])
    return {"RRA@30": pooled["rra@30"], "RTA@30": pooled["rta@30"], "AUC@30": pooled["auc@30"],
            "AUC@15": pooled["auc@15"], "AUC@5": pooled["auc@5"], "pairs": float(pooled["num_pairs"]),
            "sequences": float(len(rows))}


# --------------------------------------------------------------------------------------------------
# Co3Dv2
# --------------------------------------------------------------------------------------------------
def _co3d_test_sequences(root: pathlib.Path, category: str) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{sequence: [(image path relative to root, c2w)]} of a category's usable test sequences, in
    set-list order (VGGT preprocess_co3d.py, then the VGGT / π³ length and translation filters)."""
    cat = root / category
    set_list = _read_json(cat / CO3D_SET_LIST)
    if not isinstance(set_list, dict) or not isinstance(set_list.get("test"), list):
        raise DatasetLayoutError(f"{cat / CO3D_SET_LIST}: expected a JSON object with a 'test' list of "
                                 "[sequence_name, frame_number, image_path] entries")
    quality_file = cat / "sequence_annotations.jgz"
    good = set()
    for s in _read_json(quality_file, gz=True):
        try:
            if float(s["viewpoint_quality_score"]) > CO3D_MIN_QUALITY:
                good.add(s["sequence_name"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetLayoutError(f"{quality_file}: every entry needs sequence_name and a numeric "
                                     f"viewpoint_quality_score ({e!r})") from e
    viewpoints = _co3d_viewpoints(cat / "frame_annotations.jgz", good)
    sequences: dict[str, list] = {}
    for entry in set_list["test"]:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise DatasetLayoutError(f"{cat / CO3D_SET_LIST}: test entry {entry!r} is not "
                                     "[sequence_name, frame_number, image_path]")
        seq, frame, path = entry
        if seq not in good:
            continue
        if (seq, frame) not in viewpoints:
            raise DatasetLayoutError(f"{cat / 'frame_annotations.jgz'}: no viewpoint for sequence {seq} frame "
                                     f"{frame}, which {CO3D_SET_LIST} lists")
        sequences.setdefault(seq, []).append((path, viewpoints[(seq, frame)]))
    return {s: frames for s, frames in sequences.items()
            if len(frames) >= CO3D_MIN_FRAMES
            and all(_pt3d_t_sum(t) <= CO3D_MAX_TRANSLATION_SUM for _, (_, t) in frames)}


def _pt3d_t_sum(t) -> float:
    return float(t[0]) + float(t[1]) + float(t[2])


def _co3d_viewpoints(path: pathlib.Path, sequences: set[str]) -> dict[tuple[str, int], tuple]:
    """(sequence, frame_number) -> PyTorch3D (R, T) for the frames of `sequences`."""
    out = {}
    for f in _read_json(path, gz=True):
        try:
            if f["sequence_name"] in sequences:
                out[(f["sequence_name"], f["frame_number"])] = (f["viewpoint"]["R"], f["viewpoint"]["T"])
        except (KeyError, TypeError) as e:
            raise DatasetLayoutError(f"{path}: every frame annotation needs sequence_name, frame_number and "
                                     f"viewpoint.R / viewpoint.T ({e!r})") from e
    return out


@functools.lru_cache(maxsize=4)
def _co3d_plan(root: str) -> tuple[dict[str, list[tuple[str, tuple]]], dict[str, list[int]]]:
    """({'category/sequence': frames}, {'category/sequence': sampled ids}) of every category present."""
    root_path = pathlib.Path(root)
    present = [c for c in CO3D_CATEGORIES if (root_path / c).is_dir()]
    if not present:
        raise DatasetLayoutError(f"{root_path}: no Co3Dv2 category folder (apple/, backpack/, ...) found; "
                                 "point --data at the folder holding the 41 category folders")
    frames = {}
    for category in present:
        for seq, seq_frames in _co3d_test_sequences(root_path, category).items():
            frames[f"{category}/{seq}"] = seq_frames
    plan = legacy_sampling_plan([(name, len(f)) for name, f in frames.items()])
    return frames, plan


class Co3DPose(PoseSuite):
    name = "co3d-pose"
    columns = POSE_COLUMNS[:5] + (CO3D_CATEGORY_MEAN,) + POSE_COLUMNS[5:]
    source = ("VGGT evaluation/test_co3d.py + preprocess/preprocess_co3d.py (test split, filters, "
              "PyTorch3D->OpenCV); π³ evaluation branch relpose/ (seed-42 sampling, pooled pairs)")

    def units(self, data_dir: pathlib.Path) -> list[str]:
        return sorted(_co3d_plan(str(pathlib.Path(data_dir).resolve()))[1])

    def _frames(self, data_dir, unit):
        frames, plan = _co3d_plan(str(data_dir.resolve()))
        if unit not in plan:
            raise DatasetLayoutError(f"{data_dir}: {unit} is not a Co3Dv2 test sequence of this dataset")
        picked = [frames[unit][i] for i in plan[unit]]
        paths = [data_dir / p for p, _ in picked]
        c2w = np.stack([pytorch3d_to_opencv_c2w(r, t) for _, (r, t) in picked])
        return paths, c2w, {"category": unit.split("/")[0], "frame_ids": plan[unit]}

    def summarize(self, rows):
        """One row: the pooled pairs (π³) and, as an extra column, VGGT's mean of per-category AUC@30."""
        by_category: dict[str, list] = {}
        for r in rows:
            by_category.setdefault(r["category"], []).append(r)
        table = _pooled(rows)
        table[CO3D_CATEGORY_MEAN] = float(np.mean([_pooled(rs)["AUC@30"] for rs in by_category.values()]))
        return {"Co3Dv2": table}

    def protocol(self):
        return {**super().protocol(), "categories": len(CO3D_CATEGORIES), "set_list": CO3D_SET_LIST,
                "min_viewpoint_quality": CO3D_MIN_QUALITY, "min_frames": CO3D_MIN_FRAMES}


# --------------------------------------------------------------------------------------------------
# RealEstate10K
# --------------------------------------------------------------------------------------------------
RE10K_CAMERA_DIRS = ("metadata/test", "RealEstate10K/test", "test")  # π³ renames the tarball's folder


def _re10k_camera_dir(root: pathlib.Path) -> pathlib.Path:
    for rel in RE10K_CAMERA_DIRS:
        if (root / rel).is_dir():
            return root / rel
    raise DatasetLayoutError(f"{root}: no RealEstate10K camera folder; expected one of {list(RE10K_CAMERA_DIRS)} "
                             "holding <sequence>.txt files (RealEstate10K.tar.gz extracted)")


def read_re10k_cameras(path: pathlib.Path) -> tuple[list[str], np.ndarray]:
    """A RealEstate10K `<sequence>.txt` -> (timestamps [V], OpenCV c2w float64[V, 4, 4]).

    Line 1 is the YouTube URL; then per frame `timestamp fx fy cx cy 0 0` and the 3x4 world-to-camera
    matrix row-major (12 values): 19 fields.
    """
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: camera file not found")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    stamps, poses = [], []
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split()
        try:
            if len(fields) != 19:
                raise ValueError(f"{len(fields)} fields")
            w2c = np.eye(4)
            w2c[:3, :] = np.array([float(v) for v in fields[7:]]).reshape(3, 4)
        except ValueError as e:
            raise DatasetLayoutError(f"{path}:{n}: expected 'timestamp fx fy cx cy 0 0' and 12 world-to-camera "
                                     f"values (19 fields) ({e})") from e
        stamps.append(fields[0])
        poses.append(geometry.w2c_to_c2w(w2c))
    if not poses:
        raise DatasetLayoutError(f"{path}: no camera lines after the URL line")
    return stamps, np.stack(poses)


def _re10k_frame(seq_dir: pathlib.Path, index: int, stamp: str) -> pathlib.Path:
    """π³/VGGT prepare_re10k layout `<seq>/images/NNNN.png`, else frames named by timestamp."""
    for candidate in (seq_dir / "images" / f"{index:04d}.png", seq_dir / f"{stamp}.png", seq_dir / f"{stamp}.jpg"):
        if candidate.is_file():
            return candidate
    raise DatasetLayoutError(f"{seq_dir}: frame {index} (timestamp {stamp}) not found as images/{index:04d}.png, "
                             f"{stamp}.png or {stamp}.jpg")


@functools.lru_cache(maxsize=4)
def _re10k_plan(root: str) -> dict[str, list[int]]:
    root_path = pathlib.Path(root)
    cameras = _re10k_camera_dir(root_path)
    seqs = sorted(p.name for p in root_path.iterdir() if p.is_dir() and (cameras / f"{p.name}.txt").is_file())
    if not seqs:
        raise DatasetLayoutError(f"{root_path}: no sequence folder with a camera file in {cameras}; "
                                 "extract the test videos' frames to <data>/<sequence>/images/NNNN.png")
    return legacy_sampling_plan([(s, len(read_re10k_cameras(cameras / f"{s}.txt")[0])) for s in seqs])


class RealEstate10KPose(PoseSuite):
    name = "re10k-pose"
    source = ("π³ evaluation branch configs/data/relpose-angular.yaml + datasets/preprocess/prepare_re10k.py "
              "(10 frames, seed 42, pooled pairs); RealEstate10K camera-file format (google.github.io/realestate10k)")

    def units(self, data_dir):
        return sorted(_re10k_plan(str(pathlib.Path(data_dir).resolve())))

    def _frames(self, data_dir, unit):
        plan = _re10k_plan(str(data_dir.resolve()))
        if unit not in plan:
            raise DatasetLayoutError(f"{data_dir}: {unit} is not a RealEstate10K sequence of this dataset")
        stamps, c2w = read_re10k_cameras(_re10k_camera_dir(data_dir) / f"{unit}.txt")
        ids = plan[unit]
        paths = [_re10k_frame(data_dir / unit, i, stamps[i]) for i in ids]
        return paths, c2w[ids], {"frame_ids": ids}


# --------------------------------------------------------------------------------------------------
# TUM RGB-D dynamic sequences
# --------------------------------------------------------------------------------------------------
def _read_tum_list(path: pathlib.Path, fields: int) -> list[list[str]]:
    """Rows of a TUM text file (`#` comments skipped), each with exactly `fields` entries."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: file not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != fields:
            raise DatasetLayoutError(f"{path}:{n}: expected {fields} fields, got {len(parts)}: {line!r}")
        rows.append(parts)
    return rows


def _tum_floats(path: pathlib.Path, row: list[str]) -> list[float]:
    try:
        return [float(v) for v in row]
    except ValueError as e:
        raise DatasetLayoutError(f"{path}: non-numeric value in {' '.join(row)!r}") from e


def associate_tum(rgb: list[tuple[float, str]], gt: list[tuple[float, np.ndarray]],
                  max_difference: float = TUM_MAX_TIME_DIFFERENCE) -> list[tuple[str, np.ndarray]]:
    """rgb frames paired one-to-one with groundtruth poses as TUM's associate.py (and MonST3R's
    prepare_tum.py) pair them: all candidates with |Δt| < max_difference, taken greedily from the
    smallest |Δt|, each rgb frame and each pose used once; result in rgb time order."""
    order = np.argsort([t for t, _ in gt], kind="stable")
    gt_times = np.array([gt[k][0] for k in order])
    candidates = []
    for i, (t, _) in enumerate(rgb):
        lo, hi = np.searchsorted(gt_times, [t - max_difference, t + max_difference])
        candidates += [(abs(gt_times[k] - t), t, i, k) for k in range(lo, hi) if abs(gt_times[k] - t) < max_difference]
    used_rgb, used_gt, matches = set(), set(), []
    for _, t, i, k in sorted(candidates):
        if i not in used_rgb and k not in used_gt:
            used_rgb.add(i)
            used_gt.add(k)
            matches.append((t, i, k))
    return [(rgb[i][1], gt[order[k]][1]) for _, i, k in sorted(matches)]


def _tum_sequence(seq_dir: pathlib.Path) -> tuple[list[pathlib.Path], np.ndarray]:
    """Frames and c2w of one sequence: MonST3R's prepared rgb_90/ + groundtruth_90.txt when present,
    else the raw rgb.txt + groundtruth.txt associated and subsampled the same way."""
    if (seq_dir / "groundtruth_90.txt").is_file():
        gt_file = seq_dir / "groundtruth_90.txt"
        poses = [tum_pose_to_c2w(_tum_floats(gt_file, r)[1:]) for r in _read_tum_list(gt_file, 8)]
        frames = sorted((seq_dir / "rgb_90").glob("*.png"))
        if len(frames) != len(poses):
            raise DatasetLayoutError(f"{seq_dir}: rgb_90/ holds {len(frames)} png frames but groundtruth_90.txt "
                                     f"{len(poses)} poses; they must match one to one")
        return frames, np.stack(poses)
    rgb_file, gt_file = seq_dir / "rgb.txt", seq_dir / "groundtruth.txt"
    rgb = [(_tum_floats(rgb_file, [t])[0], name) for t, name in _read_tum_list(rgb_file, 2)]
    gt = [(v[0], tum_pose_to_c2w(v[1:])) for v in (_tum_floats(gt_file, r) for r in _read_tum_list(gt_file, 8))]
    if not rgb or not gt:
        raise DatasetLayoutError(f"{seq_dir}: rgb.txt or groundtruth.txt lists no entries")
    matched = associate_tum(rgb, gt)[::TUM_STRIDE][:TUM_FRAMES]
    if len(matched) < 2:
        raise DatasetLayoutError(f"{seq_dir}: fewer than 2 rgb frames have a groundtruth pose within "
                                 f"{TUM_MAX_TIME_DIFFERENCE} s")
    return [seq_dir / name for name, _ in matched], np.stack([p for _, p in matched])


class TUMDynamicsPose(PoseSuite):
    name = "tum-dynamics-pose"
    columns = TRAJECTORY_COLUMNS
    trajectory = True
    source = ("π³ evaluation branch configs/data/relpose-distance.yaml (MonST3R's rgb_90 / groundtruth_90 "
              "TUM-dynamics preparation); TUM RGB-D file formats (cvg.cit.tum.de/data/datasets/rgbd-dataset/file_formats)")

    def units(self, data_dir):
        data_dir = pathlib.Path(data_dir)
        seqs = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and (
            (p / "groundtruth.txt").is_file() or (p / "groundtruth_90.txt").is_file()))
        if not seqs:
            raise DatasetLayoutError(f"{data_dir}: no TUM sequence folder (one holding groundtruth.txt + rgb.txt "
                                     "or MonST3R's groundtruth_90.txt + rgb_90/)")
        return seqs

    def _frames(self, data_dir, unit):
        paths, c2w = _tum_sequence(data_dir / unit)
        return paths, c2w, {}


# --------------------------------------------------------------------------------------------------
# ScanNet (MonST3R / π³ prepared test scenes)
# --------------------------------------------------------------------------------------------------
def read_pose_rows(path: pathlib.Path) -> np.ndarray:
    """A 'replica'-format trajectory (π³ relpose/evo_utils.py load_replica_traj): one camera-to-world
    pose per line, 12 or 16 values row-major -> float64[V, 4, 4]; non-finite poses are refused."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: pose file not found")
    poses = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = np.array([float(v) for v in line.split()])
        except ValueError as e:
            raise DatasetLayoutError(f"{path}:{n}: non-numeric pose value ({e})") from e
        if values.size not in (12, 16) or not np.isfinite(values).all():
            raise DatasetLayoutError(f"{path}:{n}: expected 12 or 16 finite values (c2w row-major), got "
                                     f"{values.size} values{'' if np.isfinite(values).all() else ' with inf/nan'}")
        c2w = np.eye(4)
        c2w[:3] = values[:12].reshape(3, 4)
        poses.append(c2w)
    return np.stack(poses) if poses else np.zeros((0, 4, 4))


class ScanNetPose(PoseSuite):
    name = "scannet-pose"
    columns = TRAJECTORY_COLUMNS
    trajectory = True
    source = ("π³ evaluation branch configs/data/relpose-distance.yaml (scannetv2: color_90/*.jpg + pose_90.txt "
              "from MonST3R's ScanNet preparation)")

    def units(self, data_dir):
        data_dir = pathlib.Path(data_dir)
        scenes = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and (p / "pose_90.txt").is_file())
        if not scenes:
            raise DatasetLayoutError(f"{data_dir}: no prepared ScanNet scene (<scene>/color_90/ + pose_90.txt)")
        return scenes

    def _frames(self, data_dir, unit):
        poses = read_pose_rows(data_dir / unit / "pose_90.txt")
        frames = sorted((data_dir / unit / "color_90").glob("*.jpg"))
        if len(frames) != len(poses) or len(frames) < 2:
            raise DatasetLayoutError(f"{data_dir / unit}: color_90/ holds {len(frames)} jpg frames but pose_90.txt "
                                     f"{len(poses)} poses; they must match one to one (at least 2)")
        return frames, poses, {}


SUITES: tuple[Suite, ...] = (Co3DPose(), RealEstate10KPose(), TUMDynamicsPose(), ScanNetPose())
