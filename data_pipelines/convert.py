"""Converters from real-data layouts to records: `g2vlm convert-data {npz,scannet,spar,vqa}`.

Each converter builds one tfds dataset '<builder>/<name>' under out_dir (ArrayRecord), then checks
the first record of every split. Scene converters decode it strictly and measure the median relative
reprojection depth error between consecutive views (`consistency.py`) — a wrong pose convention or
depth unit shows up there as tens of percent. Read the result back with
`builders.open_scenes(result.dataset, split=..., data_dir=out_dir)` (or `builders.open_vqa` for the
general-VQA converter, whose records have no geometry).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import shutil

import tensorflow_datasets as tfds

from data_pipelines import consistency
from data_pipelines.builders import base
from data_pipelines.builders.npz_scenes import NpzScenes, NpzScenesConfig
from data_pipelines.builders.scannet import ScannetConfig, ScannetScenes
from data_pipelines.builders.spar import SparQa, SparQaConfig
from data_pipelines.builders.vqa import VqaConfig, VqaSamples
from g2vlm_jax.outputs import prepare_output_dir

log = logging.getLogger(__name__)
WARN_REPROJECTION = 0.03  # median relative error above which the geometry is suspect (correct data: < 1.5 %)


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What a converter wrote."""

    dataset: str  # tfds name to read: '<builder>/<config name>'
    data_dir: str
    splits: dict[str, int]  # records per split
    skipped: dict[str, int]  # frames/rows left out, by reason
    reprojection: dict[str, float]  # first record of each split: median relative depth error (nan: no overlap)


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir, overwrite: bool) -> tuple[str, dict]:
    """Prepares the dataset, refusing to reuse an existing one silently; -> ('<builder>/<config>', splits)."""
    source = pathlib.Path(manual_dir)
    if not source.exists() or (source.is_dir() and not any(source.iterdir())):
        raise FileNotFoundError(f"source {source} does not exist or is empty; pass the folder (or file) to convert")
    target = pathlib.Path(builder.data_dir)
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) or another name")
        shutil.rmtree(target)
    try:
        splits = base.prepare(builder, manual_dir)
    except BaseException:
        # Nothing half written: a failed conversion (a bad record in strict mode, Ctrl-C) leaves no
        # dataset folder that a later run would mistake for a finished one or refuse to overwrite.
        shutil.rmtree(target, ignore_errors=True)
        raise
    return f"{builder.name}/{builder.builder_config.name}", splits


def _build(builder: tfds.core.DatasetBuilder, manual_dir, out_dir, overwrite: bool) -> tuple[str, dict, dict]:
    """Prepares a scene dataset and checks the geometry of the first record of every split."""
    name, splits = _prepare(builder, manual_dir, overwrite)
    checks, first_ids = {}, {}
    try:
        for split in splits:
            scene = base.open_scenes(name, split=split, data_dir=out_dir, strict=False)[0]
            checks[split], first_ids[split] = consistency.median_reprojection_error(scene), scene.scene_id
    except BaseException:
        shutil.rmtree(builder.data_dir, ignore_errors=True)  # nothing half written (see _prepare)
        raise
    for split in splits:
        if checks[split] > WARN_REPROJECTION:
            log.warning("%s %s: first record %s has median reprojection error %.1f%%; check pose convention "
                        "(camera-to-world, OpenCV axes), depth units and intrinsics", name, split, first_ids[split],
                        100 * checks[split])
    return name, splits, checks


def convert_npz_scene(src_dir, out_dir, *, name: str = "default", dataset: str = "npz", split: str = "train",
                      z_far: float = 0.0, normal_loss: bool = False, image_format: str = "png",
                      overwrite: bool = False) -> ConvertResult:
    """Scene folders of condition.npz + rgb/{i}.png (see builders/npz_scenes.py) -> 'npz_scenes/<name>'."""
    cfg = NpzScenesConfig(name=name, dataset=dataset, split=split, z_far=z_far, normal_loss=normal_loss,
                          image_format=image_format)
    builder = NpzScenes(config=cfg, data_dir=str(out_dir))
    dataset_name, splits, checks = _build(builder, src_dir, out_dir, overwrite)
    return ConvertResult(dataset_name, str(out_dir), splits, {}, checks)


def convert_scannet(src_root, out_dir, *, name: str = "default", split: str = "train", frame_stride: int = 10,
                    max_frames: int = 0, z_far: float = 80.0, image_format: str = "jpeg",
                    overwrite: bool = False) -> ConvertResult:
    """ScanNet export folders (see builders/scannet.py) -> 'scannet_scenes/<name>'."""
    cfg = ScannetConfig(name=name, split=split, frame_stride=frame_stride, max_frames=max_frames, z_far=z_far,
                        image_format=image_format)
    builder = ScannetScenes(config=cfg, data_dir=str(out_dir))
    dataset_name, splits, checks = _build(builder, src_root, out_dir, overwrite)
    skipped = {"nonfinite_pose": builder.dropped_frames} if builder.dropped_frames else {}
    return ConvertResult(dataset_name, str(out_dir), splits, skipped, checks)


def convert_spar_qa(jsonl, out_dir, *, name: str = "default", split: str = "train", image_root=None,
                    dataset: str = "spar", z_far: float = 80.0, image_format: str = "jpeg",
                    overwrite: bool = False) -> ConvertResult:
    """SPAR-style jsonl rows (see builders/spar.py) -> 'spar_qa/<name>'; image paths are relative to
    image_root (default: the jsonl's folder)."""
    jsonl = pathlib.Path(jsonl).resolve()
    if not jsonl.is_file():
        raise ValueError(f"jsonl file {jsonl} does not exist")
    cfg = SparQaConfig(name=name, files=((split, str(jsonl)),), dataset=dataset, z_far=z_far,
                       image_format=image_format)
    builder = SparQa(config=cfg, data_dir=str(out_dir))
    dataset_name, splits, checks = _build(builder, image_root or jsonl.parent, out_dir, overwrite)
    return ConvertResult(dataset_name, str(out_dir), splits, dict(builder.skipped), checks)


def convert_vqa(jsonl, out_dir, *, name: str = "default", split: str = "train", image_root=None,
                dataset: str = "vqa", overwrite: bool = False) -> ConvertResult:
    """General VQA jsonl rows (see builders/vqa.py) -> 'vqa_samples/<name>'; image paths are relative to
    image_root (default: the jsonl's folder). The first record of every split is decoded as a check
    (VQA records have no geometry: `reprojection` is empty)."""
    jsonl = pathlib.Path(jsonl).resolve()
    if not jsonl.is_file():
        raise ValueError(f"jsonl file {jsonl} does not exist")
    builder = VqaSamples(config=VqaConfig(name=name, files=((split, str(jsonl)),), dataset=dataset),
                         data_dir=str(out_dir))
    dataset_name, splits = _prepare(builder, image_root or jsonl.parent, overwrite)
    for split, count in splits.items():
        if count:
            base.open_vqa(dataset_name, split=split, data_dir=out_dir)[0]  # raises BadRecordError if undecodable
    return ConvertResult(dataset_name, str(out_dir), splits, dict(builder.skipped), {})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2vlm convert-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="layout", required=True)
    layouts = {"npz": ("src_dir", "condition.npz + rgb/ scene folder(s)"),
               "scannet": ("src_root", "ScanNet export root (scene folders)"),
               "spar": ("jsonl", "SPAR-style jsonl file"),
               "vqa": ("jsonl", "general VQA jsonl file (LLaVA conversations or question/answer rows)")}
    for layout, (src, help_text) in layouts.items():
        p = sub.add_parser(layout, help=help_text)
        p.add_argument(src, help=help_text)
        p.add_argument("out_dir", help="tfds data_dir to write into")
        p.add_argument("--name", default="default", help="config name: the dataset is read as <builder>/<name>")
        p.add_argument("--split", default="train", choices=base.SPLITS,
                       help="split of sources not under train/validation/test folders")
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of this name")
        if layout != "vqa":  # VQA images keep their source bytes; VQA records have no depth
            p.add_argument("--image-format", choices=("png", "jpeg"), default="png" if layout == "npz" else "jpeg")
            p.add_argument("--z-far", type=float, default=0.0 if layout == "npz" else 80.0)
    npz = sub.choices["npz"]
    npz.add_argument("--dataset", default="npz", help="Scene.dataset stored in every record")
    npz.add_argument("--normal-loss", action="store_true", help="the depth is good enough for the normal loss")
    scannet = sub.choices["scannet"]
    scannet.add_argument("--frame-stride", type=int, default=10)
    scannet.add_argument("--max-frames", type=int, default=0, help="frames per record (0 = whole scene)")
    spar = sub.choices["spar"]
    spar.add_argument("--image-root", default=None, help="folder the row paths are relative to")
    spar.add_argument("--dataset", default="spar")
    vqa = sub.choices["vqa"]
    vqa.add_argument("--image-root", default=None, help="folder the row image paths are relative to")
    vqa.add_argument("--dataset", default="vqa", help="VQASample.dataset stored in every record")
    return parser


def main(argv: list[str] | None = None) -> ConvertResult:
    """`g2vlm convert-data LAYOUT SRC OUT_DIR [options]`; prints and returns the ConvertResult."""
    args = _parser().parse_args(argv)
    prepare_output_dir(args.out_dir, "OUT_DIR")
    if args.layout == "vqa":
        result = convert_vqa(args.jsonl, args.out_dir, name=args.name, split=args.split, image_root=args.image_root,
                             dataset=args.dataset, overwrite=args.overwrite)
        print(f"wrote {result.dataset} to {result.data_dir}: {result.splits}; skipped {result.skipped}")
        return result
    common = dict(name=args.name, split=args.split, z_far=args.z_far, image_format=args.image_format,
                  overwrite=args.overwrite)
    if args.layout == "npz":
        result = convert_npz_scene(args.src_dir, args.out_dir, dataset=args.dataset, normal_loss=args.normal_loss,
                                   **common)
    elif args.layout == "scannet":
        result = convert_scannet(args.src_root, args.out_dir, frame_stride=args.frame_stride,
                                 max_frames=args.max_frames, **common)
    else:
        result = convert_spar_qa(args.jsonl, args.out_dir, image_root=args.image_root, dataset=args.dataset,
                                 **common)
    print(f"wrote {result.dataset} to {result.data_dir}: {result.splits}; skipped {result.skipped}; "
          f"median reprojection error of the first record per split {result.reprojection}")
    return result


if __name__ == "__main__":
    main()
