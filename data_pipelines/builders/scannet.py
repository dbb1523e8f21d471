"""`scannet_scenes`: ScanNet scenes in the layout of the official SensorData export.

A scene folder (e.g. scene0000_00/) holds
    color/{frame}.jpg                 RGB (1296 x 968 in ScanNet v2)
    depth/{frame}.png                 uint16 millimetres, 0 = no value (640 x 480)
    pose/{frame}.txt                  4 x 4 camera-to-world, OpenCV axes; frames whose tracking was
                                      lost hold -inf/nan and are skipped (counted)
    intrinsic/intrinsic_depth.txt     4 x 4, top-left 3 x 3 is K of the depth camera
    intrinsic/intrinsic_color.txt     4 x 4, K of the colour camera
Frames are numbered 0, 1, 2, ...; every `frame_stride`-th one is kept.

Resolution: geometry is supervised at depth resolution, so colour is resized (Lanczos) to the
depth size and every view gets the depth intrinsics, as the official pipeline does. ScanNet's
colour and depth streams are registered but come from different sensors, so this pairing is an
approximation at the level of a pixel or two; depth, poses and intrinsics themselves are exact.
Depth is stored as png16 with scale 0.001 m, which reproduces the source millimetres exactly.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import records
from g2vlm_jax.console import progress
from data_pipelines.builders.base import SceneRecordBuilder, find_scene_dirs
from data_pipelines.scene import Scene

DEPTH_SCALE = 0.001  # ScanNet depth PNGs hold millimetres


@dataclasses.dataclass
class ScannetConfig(tfds.core.BuilderConfig):
    """Frame selection and record layout."""

    split: str = "train"  # split of scenes that are not under a <split>/ folder
    frame_stride: int = 10  # keep every n-th frame (ScanNet runs at 30 fps)
    max_frames: int = 0  # frames per record; longer scenes become records '<scene>_000', '_001', ... (0 = whole scene)
    z_far: float = 80.0  # SPEC 3: ScanNet far plane
    normal_loss: bool = True  # ScanNet is in the official mid-quality list
    image_format: str = "jpeg"  # the source is JPEG; PNG would only store its artefacts losslessly


def is_scannet_scene(path: pathlib.Path) -> bool:
    return all((path / sub).is_dir() for sub in ("color", "depth", "pose", "intrinsic"))


def _read_matrix(path: pathlib.Path) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"missing {path} (ScanNet export layout)")
    matrix = np.loadtxt(path, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"{path} holds a {matrix.shape} matrix, expected 4 x 4")
    return matrix


def scannet_frames(scene_dir: pathlib.Path, frame_stride: int) -> tuple[list[int], list[int]]:
    """(kept frame ids with a finite pose, dropped frame ids whose pose is not finite)."""
    if frame_stride < 1:
        raise ValueError(f"frame_stride={frame_stride} must be >= 1")
    frames = sorted(int(p.stem) for p in (scene_dir / "color").glob("*.jpg") if p.stem.isdigit())
    if not frames:
        raise ValueError(f"no color/<frame>.jpg files in {scene_dir}")
    kept, dropped = [], []
    for f in frames[::frame_stride]:
        (kept if np.all(np.isfinite(_read_matrix(scene_dir / "pose" / f"{f}.txt"))) else dropped).append(f)
    return kept, dropped


def read_scannet_frames(scene_dir: str | pathlib.Path, frames: list[int], *, scene_id: str | None = None,
                        z_far: float = 80.0, normal_loss: bool = True) -> Scene:
    """The given frames of a ScanNet scene folder as a Scene at depth resolution (see module docstring)."""
    scene_dir = pathlib.Path(scene_dir)
    k_depth = _read_matrix(scene_dir / "intrinsic" / "intrinsic_depth.txt")[:3, :3]
    images, depths, poses = [], [], []
    for f in frames:
        depth_path, color_path = scene_dir / "depth" / f"{f}.png", scene_dir / "color" / f"{f}.jpg"
        if not depth_path.is_file():
            raise ValueError(f"missing {depth_path} for colour frame {color_path}")
        with Image.open(depth_path) as im:
            units = np.asarray(im)
        if units.dtype != np.uint16:
            raise ValueError(f"{depth_path} is {units.dtype}; ScanNet depth PNGs are uint16 millimetres")
        with Image.open(color_path) as im:
            rgb = im.convert("RGB")
            if rgb.size != (units.shape[1], units.shape[0]):
                rgb = rgb.resize((units.shape[1], units.shape[0]), Image.Resampling.LANCZOS)
            images.append(np.asarray(rgb, dtype=np.uint8))
        depths.append(units.astype(np.float32) * np.float32(DEPTH_SCALE))
        poses.append(_read_matrix(scene_dir / "pose" / f"{f}.txt"))
    return Scene(scene_id=scene_id or scene_dir.name, dataset="scannet", images=np.stack(images),
                 depth=np.stack(depths), intrinsics=np.repeat(k_depth[None], len(frames), 0).astype(np.float32),
                 c2w=np.stack(poses).astype(np.float32), z_far=float(z_far), normal_loss=bool(normal_loss))


class ScannetScenes(SceneRecordBuilder):
    """ScanNet RGB-D scenes (SensorData export layout) at depth resolution."""

    CONFIG_CLASS = ScannetConfig
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass the exported ScanNet folder as manual_dir: scene folders with color/, "
                                    "depth/, pose/, intrinsic/ (optionally under train/validation/test).")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dropped_frames = 0  # frames skipped for a non-finite pose during the last build

    def _split_generators(self, dl_manager):
        cfg = self.settings
        found = find_scene_dirs(dl_manager.manual_dir, is_scannet_scene, cfg.split, "color/ depth/ pose/ intrinsic/")
        return {split: self._generate_examples(split, dirs) for split, dirs in found.items()}

    def _generate_examples(self, split: str, dirs: list[pathlib.Path]):
        cfg = self.settings
        for scene_dir in progress(dirs, desc=f"scannet {split}", leave=False):
            kept, dropped = scannet_frames(scene_dir, cfg.frame_stride)
            self.dropped_frames += len(dropped)
            size = cfg.max_frames or len(kept)
            chunks = [kept[i:i + size] for i in range(0, len(kept), size)]
            for c, frames in enumerate(chunks):
                scene_id = scene_dir.name if len(chunks) == 1 else f"{scene_dir.name}_{c:03d}"
                scene = read_scannet_frames(scene_dir, frames, scene_id=scene_id, z_far=cfg.z_far,
                                            normal_loss=cfg.normal_loss)
                yield scene_id, records.scene_to_record(scene, image_format=cfg.image_format,
                                                        depth_codec="png16", depth_scale=DEPTH_SCALE)
