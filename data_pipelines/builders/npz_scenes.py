"""`npz_scenes`: generic multi-view RGB-D scene folders (the layout of shared/fixtures/pi3_room).

A scene folder holds
    condition.npz   depths float32[V, H, W] metres (0 = no value), poses float32[V, 4, 4]
                    camera-to-world (OpenCV axes), intrinsics float32[V, 3, 3] or [3, 3] (pixel units)
    rgb/{i}.png     (or .jpg) for i in 0..V-1, H x W RGB
The source folder (tfds manual_dir) is one scene, a folder of scenes, or a folder with
train/validation/test sub-folders of scenes (see `base.find_scene_dirs`). Depth is stored exactly
(f32_zlib); images as PNG by default, so a round trip is bit-exact.
"""
from __future__ import annotations

import dataclasses
import pathlib
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import records
from g2vlm_jax.console import progress
from data_pipelines.builders.base import SceneRecordBuilder, find_scene_dirs
from data_pipelines.scene import Scene


@dataclasses.dataclass
class NpzScenesConfig(tfds.core.BuilderConfig):
    """How to label and store the converted scenes."""

    dataset: str = "npz"  # Scene.dataset of every record
    split: str = "train"  # split of scenes that are not under a <split>/ folder
    z_far: float = 0.0  # far plane (m) of the dataset; 0 = none
    normal_loss: bool = False  # True only for datasets whose depth is good enough for the normal loss
    image_format: str = "png"  # 'png' (lossless) or 'jpeg'


def is_npz_scene(path: pathlib.Path) -> bool:
    return (path / "condition.npz").is_file() and (path / "rgb").is_dir()


def _read_rgb(folder: pathlib.Path, index: int) -> np.ndarray:
    for suffix in (".png", ".jpg", ".jpeg"):
        path = folder / f"{index}{suffix}"
        if path.is_file():
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
    raise ValueError(f"missing image {folder}/{index}.png (or .jpg): the npz layout needs rgb/{{i}}.png per view")


def read_npz_scene(scene_dir: str | pathlib.Path, *, dataset: str = "npz", z_far: float = 0.0,
                   normal_loss: bool = False) -> Scene:
    """Reads one scene folder (layout in the module docstring) into a Scene; ValueError names what is wrong."""
    scene_dir = pathlib.Path(scene_dir)
    path = scene_dir / "condition.npz"
    with open(path, "rb") as f:  # an .npz is a zip archive; anything else would reach numpy's pickle branch
        head = f.read(4)
    if head != b"PK\x03\x04":
        raise ValueError(f"{path} is not a .npz archive (it starts with {head!r}, not a zip header); write it with "
                         "numpy.savez(depths=..., poses=..., intrinsics=...)")
    try:
        # Never unpickle: an npz holding object arrays (pickles) can run code when loaded.
        with np.load(path, allow_pickle=False) as npz:
            missing = sorted({"depths", "poses", "intrinsics"} - set(npz.files))
            if missing:
                raise ValueError(f"{path} lacks {missing} (has {sorted(npz.files)})")
            depth = npz["depths"].astype(np.float32)
            c2w = npz["poses"].astype(np.float32)
            intrinsics = npz["intrinsics"].astype(np.float32)
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz archive ({type(e).__name__}: {e}); write it with "
                         "numpy.savez(depths=..., poses=..., intrinsics=...)") from e
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
        raise ValueError(f"{path} holds pickled object arrays, which g2vlm never loads; save plain numeric arrays "
                         "with numpy.savez(depths=..., poses=..., intrinsics=...)") from e
    if depth.ndim != 3 or c2w.shape != (len(depth), 4, 4):
        raise ValueError(f"{scene_dir}/condition.npz: depths {depth.shape} must be [V, H, W] and poses "
                         f"{c2w.shape} [V, 4, 4]")
    usable = np.isfinite(depth) & (depth > 0)
    empty = [i for i in range(len(depth)) if not usable[i].any()]
    if empty:
        found = ("only NaN/inf" if not np.isfinite(depth[empty[0]]).any() else
                 f"no positive value (max {float(np.nanmax(depth[empty[0]])):g})")
        raise ValueError(f"{path}: depth of view(s) {empty} has {found}; depths are metres > 0 (0 or NaN only where "
                         "unknown): check the units and sign of the depth maps")
    if intrinsics.shape == (3, 3):
        intrinsics = np.repeat(intrinsics[None], len(depth), axis=0)
    if intrinsics.shape != (len(depth), 3, 3):
        raise ValueError(f"{scene_dir}/condition.npz: intrinsics {intrinsics.shape} must be [V, 3, 3] or [3, 3]")
    images = np.stack([_read_rgb(scene_dir / "rgb", i) for i in range(len(depth))])
    if images.shape[1:3] != depth.shape[1:]:
        raise ValueError(f"{scene_dir}: images are {images.shape[1:3]} but depths {depth.shape[1:]}; "
                         "the npz layout needs images and depth of the same size")
    return Scene(scene_id=scene_dir.name, dataset=dataset, images=images, depth=depth, intrinsics=intrinsics,
                 c2w=c2w, z_far=float(z_far), normal_loss=bool(normal_loss))


class NpzScenes(SceneRecordBuilder):
    """Generic multi-view RGB-D scenes from condition.npz + rgb/{i}.png folders."""

    CONFIG_CLASS = NpzScenesConfig
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass the source folder as manual_dir: one scene folder (condition.npz + "
                                    "rgb/), a folder of scene folders, or train/validation/test sub-folders of them.")

    def _split_generators(self, dl_manager):
        cfg = self.settings
        found = find_scene_dirs(dl_manager.manual_dir, is_npz_scene, cfg.split, "condition.npz and rgb/")
        return {split: self._generate_examples(split, dirs) for split, dirs in found.items()}

    def _generate_examples(self, split: str, dirs: list[pathlib.Path]):
        cfg = self.settings
        for scene_dir in progress(dirs, desc=f"npz scenes {split}", leave=False):
            scene = read_npz_scene(scene_dir, dataset=cfg.dataset, z_far=cfg.z_far, normal_loss=cfg.normal_loss)
            yield scene.scene_id, records.scene_to_record(scene, image_format=cfg.image_format)
