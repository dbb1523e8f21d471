"""Real-data converters: the pi3_room fixture (npz layout), a fake ScanNet export and SPAR-style
jsonl rows, written in their real file formats, converted to ArrayRecord and read back."""
import dataclasses
import json
import os
import subprocess
import sys
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import convert, records
from data_pipelines.builders import open_scenes
from data_pipelines.synthetic import RenderConfig, render_scene, synthetic_qa_scene

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pi3_room() -> pathlib.Path:
    # shared/ sits next to the checkout (or two levels up for a worktree under wt/)
    for base in (ROOT, ROOT.parent, ROOT.parent.parent):
        path = base / "shared" / "fixtures" / "pi3_room"
        if (path / "condition.npz").is_file():
            return path
    pytest.fail("shared/fixtures/pi3_room not found next to the checkout")


def _reprojection_median(scene, i, j):
    """Median relative depth error of view i's pixels seen in view j (nearest pixel), numpy only."""
    h, w = scene.depth.shape[1:]
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    k_i, k_j = scene.intrinsics[i].astype(np.float64), scene.intrinsics[j].astype(np.float64)
    z = scene.depth[i].astype(np.float64)
    cam = np.stack([(jj - k_i[0, 2]) / k_i[0, 0] * z, (ii - k_i[1, 2]) / k_i[1, 1] * z, z], -1)[z > 0]
    rel = np.linalg.inv(scene.c2w[j].astype(np.float64)) @ scene.c2w[i].astype(np.float64)
    p = cam @ rel[:3, :3].T + rel[:3, 3]
    u = np.round(k_j[0, 0] * p[:, 0] / p[:, 2] + k_j[0, 2]).astype(int)
    v = np.round(k_j[1, 1] * p[:, 1] / p[:, 2] + k_j[1, 2]).astype(int)
    ok = (p[:, 2] > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    target = scene.depth[j][v[ok], u[ok]]
    seen = target > 0
    return float(np.median(np.abs(p[ok, 2][seen] - target[seen]) / target[seen]))


def test_pi3_room_round_trip_is_exact_and_consistent(tmp_path):
    src = _pi3_room()
    result = convert.convert_npz_scene(src, tmp_path, name="pi3_room", dataset="pi3", normal_loss=True)
    assert result.dataset == "npz_scenes/pi3_room" and result.splits == {"train": 1}
    assert result.reprojection["train"] < 0.01
    scene = open_scenes(result.dataset, split="train", data_dir=tmp_path)[0]
    with np.load(src / "condition.npz") as npz:
        np.testing.assert_array_equal(scene.depth, npz["depths"])  # exact: depth is stored as float32
        np.testing.assert_array_equal(scene.c2w, npz["poses"])
        np.testing.assert_array_equal(scene.intrinsics, npz["intrinsics"])
    for i in range(scene.num_views):
        np.testing.assert_array_equal(scene.images[i], np.asarray(Image.open(src / "rgb" / f"{i}.png").convert("RGB")))
    assert (scene.scene_id, scene.dataset, scene.normal_loss) == ("pi3_room", "pi3", True)
    for i in range(3):  # overlapping neighbours
        assert _reprojection_median(scene, i, i + 1) < 0.01
    with pytest.raises(ValueError, match="convert-data"):
        open_scenes("npz_scenes/not_converted", split="train", data_dir=tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        convert.convert_npz_scene(src, tmp_path, name="pi3_room")
    again = convert.convert_npz_scene(src, tmp_path, name="pi3_room", overwrite=True)
    assert again.splits == {"train": 1}


def _write_npz_scene(folder: pathlib.Path, scene, drop_image: int | None = None):
    (folder / "rgb").mkdir(parents=True)
    np.savez(folder / "condition.npz", depths=scene.depth, poses=scene.c2w, intrinsics=scene.intrinsics[0])
    for i, image in enumerate(scene.images):
        if i != drop_image:
            Image.fromarray(image).save(folder / "rgb" / f"{i}.png")


def test_npz_split_folders_and_layout_errors(tmp_path):
    cfg = RenderConfig(height=21, width=28, num_views=3)
    scenes = {s: render_scene(s, 0, cfg).scene for s in ("train", "test")}
    for split, scene in scenes.items():
        _write_npz_scene(tmp_path / "src" / split / f"room_{split}", scene)
    result = convert.convert_npz_scene(tmp_path / "src", tmp_path / "out", name="split_layout")
    assert result.splits == {"train": 1, "test": 1} and result.reprojection["test"] < 1e-3
    back = open_scenes(result.dataset, split="test", data_dir=tmp_path / "out")[0]
    np.testing.assert_array_equal(back.images, scenes["test"].images)
    assert back.scene_id == "room_test"

    _write_npz_scene(tmp_path / "broken" / "room", scenes["train"], drop_image=2)
    with pytest.raises(ValueError, match="rgb/2.png"):
        convert.convert_npz_scene(tmp_path / "broken", tmp_path / "out", name="broken")
    # Nothing half written: once the source is fixed the same name converts (no 'already exists').
    assert not (tmp_path / "out" / "npz_scenes" / "broken" / "1.0.0").exists()
    _write_npz_scene(tmp_path / "fixed" / "room", scenes["train"])
    assert convert.convert_npz_scene(tmp_path / "fixed", tmp_path / "out", name="broken").splits == {"train": 1}
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        convert.convert_npz_scene(tmp_path / "fixed", tmp_path / "out", name="broken")
    with pytest.raises(FileNotFoundError, match="does not exist or is empty"):
        convert.convert_npz_scene(tmp_path / "nowhere", tmp_path / "out", name="nowhere")
    (tmp_path / "empty" / "notes").mkdir(parents=True)  # a folder, but not a scene
    with pytest.raises(ValueError, match="no scene folders"):
        convert.convert_npz_scene(tmp_path / "empty", tmp_path / "out", name="empty")


# --------------------------------------------------------------------------------------------------
# ScanNet export layout
# --------------------------------------------------------------------------------------------------
def _write_scannet_scene(folder: pathlib.Path, bad_pose_frame: int):
    """A synthetic room in ScanNet's formats: colour JPEGs at 2x the depth resolution, uint16 mm depth."""
    depth_scene = render_scene("train", 7, RenderConfig(height=30, width=40, num_views=6)).scene
    colour_scene = render_scene("train", 7, RenderConfig(height=60, width=80, num_views=6)).scene
    for sub in ("color", "depth", "pose", "intrinsic"):
        (folder / sub).mkdir(parents=True)
    millimetres = np.round(depth_scene.depth * 1000).astype(np.uint16)
    for f in range(6):
        Image.fromarray(colour_scene.images[f]).save(folder / "color" / f"{f}.jpg", quality=95)
        Image.fromarray(millimetres[f]).save(folder / "depth" / f"{f}.png")
        pose = np.full((4, 4), -np.inf) if f == bad_pose_frame else depth_scene.c2w[f].astype(np.float64)
        np.savetxt(folder / "pose" / f"{f}.txt", pose)
    for name, k in (("intrinsic_depth", depth_scene.intrinsics[0]), ("intrinsic_color", colour_scene.intrinsics[0])):
        k4 = np.eye(4)
        k4[:3, :3] = k
        np.savetxt(folder / "intrinsic" / f"{name}.txt", k4)
    return depth_scene, millimetres


def test_scannet_export_converts_at_depth_resolution(tmp_path):
    truth, millimetres = _write_scannet_scene(tmp_path / "scans" / "scene0007_00", bad_pose_frame=3)
    result = convert.convert_scannet(tmp_path / "scans", tmp_path / "out", name="chunks", frame_stride=1, max_frames=2)
    assert result.splits == {"train": 3} and result.skipped == {"nonfinite_pose": 1}
    source = open_scenes(result.dataset, split="train", data_dir=tmp_path / "out")
    kept = [[0, 1], [2, 4], [5]]  # frame 3 has a -inf pose; chunks of 2 frames
    for c, frames in enumerate(kept):
        scene = source[c]
        assert scene.scene_id == f"scene0007_00_{c:03d}" and scene.dataset == "scannet"
        assert scene.images.shape == (len(frames), 30, 40, 3) and (scene.z_far, scene.normal_loss) == (80.0, True)
        np.testing.assert_array_equal(scene.depth, millimetres[frames].astype(np.float32) * np.float32(0.001))
        np.testing.assert_array_equal(scene.c2w, truth.c2w[frames])
        np.testing.assert_array_equal(scene.intrinsics, truth.intrinsics[frames])  # depth intrinsics
        assert np.abs(scene.images.astype(int) - truth.images[frames]).mean() < 12  # resized JPEG vs direct render
    assert _reprojection_median(source[0], 0, 1) < 0.01  # millimetre quantisation only

    whole = convert.main(["scannet", str(tmp_path / "scans"), str(tmp_path / "out"), "--name", "cli",
                          "--frame-stride", "2", "--split", "validation"])
    assert whole.splits == {"validation": 1} and whole.skipped == {}  # frames 0, 2, 4
    np.testing.assert_array_equal(open_scenes(whole.dataset, split="validation", data_dir=tmp_path / "out")[0].c2w,
                                  truth.c2w[[0, 2, 4]])


# --------------------------------------------------------------------------------------------------
# SPAR-style jsonl
# --------------------------------------------------------------------------------------------------
def _write_spar_rows(root: pathlib.Path):
    """Rows in the accepted format; returns (truth scene at depth size, millimetres, good rows)."""
    small = synthetic_qa_scene("train", 2, RenderConfig(height=30, width=40, num_views=3)).scene
    big = render_scene("train", 2, RenderConfig(height=60, width=80, num_views=3)).scene
    millimetres = np.round(small.depth * 1000).astype(np.uint16)
    for v in range(3):
        Image.fromarray(big.images[v]).save(root / f"big{v}.png")
        Image.fromarray(small.images[v]).save(root / f"small{v}.png")
        Image.fromarray(millimetres[v]).save(root / f"depth{v}.png")
    qa = small.qa[0]
    row_a = {"id": "row-a", "image_list": [f"big{v}.png" for v in range(3)],
             "depth_list": [f"depth{v}.png" for v in range(3)], "poses": small.c2w.tolist(),
             "intrinsic": [np.pad(big.intrinsics[v], ((0, 1), (0, 1))).tolist() for v in range(3)],
             "depth_intrinsic": small.intrinsics[0].tolist(), "question": qa.question, "answer": qa.answer,
             "answer_type": qa.answer_type, "task": qa.task, "markers": [[1, 10.0, 20.0, "X"]]}
    row_b = {"image_list": [f"small{v}.png" for v in range(2)], "depth_list": [f"depth{v}.png" for v in range(2)],
             "poses": [p.ravel().tolist() for p in small.c2w[:2]], "intrinsic": small.intrinsics[0].tolist(),
             "depth_scale": 0.001, "question": "Which is closer?\nA. red\nB. blue", "answer": "B",
             "metadata": {"type": "depth_prediction_oc", "red_point": [[500, 250]], "blue_point": [[100, 900]],
                          "point_img_idx": [[0, 1]]}}
    bad = [dict(row_b, metadata={"type": "x", "red_bbox": [[1, 2, 3, 4]]}),  # bbox_markers
           dict(row_b, answer="left"),  # bad_answer_type
           {k: v for k, v in row_b.items() if k != "poses"}]  # missing_field
    lines = [json.dumps(row_a), json.dumps(bad[0]), "{not json", json.dumps(row_b), json.dumps(bad[1]),
             json.dumps(bad[2])]
    (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return small, millimetres


def test_spar_rows_convert_skip_bad_rows_and_read_back(tmp_path):
    truth, millimetres = _write_spar_rows(tmp_path)
    result = convert.convert_spar_qa(tmp_path / "rows.jsonl", tmp_path / "out", image_format="png")
    assert result.splits == {"train": 2}
    assert result.skipped == {"bbox_markers": 1, "bad_answer_type": 1, "bad_json": 1, "missing_field": 1}
    source = open_scenes(result.dataset, split="train", data_dir=tmp_path / "out")
    a, b = source[0], source[1]
    assert a.scene_id == "row-a" and b.scene_id == "rows-3" and a.dataset == "spar"
    np.testing.assert_array_equal(a.depth, millimetres.astype(np.float32) * np.float32(0.001))
    np.testing.assert_array_equal(a.c2w, truth.c2w)
    np.testing.assert_array_equal(a.intrinsics, truth.intrinsics)  # images resized to depth size -> depth K
    assert a.images.shape == (3, 30, 40, 3)
    assert a.qa == (dataclasses.replace(truth.qa[0], views=(0, 1, 2), markers=((1, 4.75, 9.75, "X"),)),)
    np.testing.assert_array_equal(b.images, truth.images[:2])  # same size as depth: stored untouched (PNG)
    np.testing.assert_array_equal(b.intrinsics, truth.intrinsics[:2])
    (qa_b,) = b.qa
    assert (qa_b.answer, qa_b.answer_type, qa_b.task, qa_b.views) == ("B", "choice", "depth_prediction_oc", (0, 1))
    assert qa_b.markers == ((0, 19.5, 7.0, "red"), (1, 3.5, 26.5, "blue"))
    assert _reprojection_median(a, 0, 1) < 0.01

    cli = convert.main(["spar", str(tmp_path / "rows.jsonl"), str(tmp_path / "out"), "--name", "cli", "--split",
                        "test"])
    record = tfds.data_source(cli.dataset, split="test", data_dir=str(tmp_path / "out"))[1]
    assert records.record_to_scene(record).qa == b.qa


def test_spar_missing_image_is_a_setup_error(tmp_path):
    row = {"image_list": ["nowhere.png"], "depth_list": ["nowhere_depth.png"], "poses": np.eye(4).tolist(),
           "intrinsic": np.eye(3).tolist(), "question": "q", "answer": "1"}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert.convert_spar_qa(tmp_path / "rows.jsonl", tmp_path / "out")


@pytest.mark.parametrize("case", ["nan", "negative", "text"])
def test_npz_depth_without_values_and_non_npz_files_are_named(tmp_path, case):
    """`g2vlm convert-data npz` (the real entry point) on a scene whose depth has no usable value, or whose
    condition.npz is a text file: one line naming the file and the fix, exit 2, nothing written."""
    scene = render_scene("train", 3, RenderConfig(height=21, width=28, num_views=3)).scene
    if case == "nan":
        scene = dataclasses.replace(scene, depth=np.where(np.arange(3)[:, None, None] == 1, np.nan, scene.depth))
    if case == "negative":
        scene = dataclasses.replace(scene, depth=-scene.depth)
    _write_npz_scene(tmp_path / "src" / "room", scene)
    if case == "text":
        (tmp_path / "src" / "room" / "condition.npz").write_text("depths: see the csv files\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "g2vlm_jax.cli", "convert-data", "npz", str(tmp_path / "src"),
                          str(tmp_path / "out"), "--name", "room"], capture_output=True, text=True, env=env,
                         cwd=str(ROOT), timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr and "condition.npz" in line
    assert {"nan": "depth of view(s) [1] has only NaN/inf", "negative": "depth of view(s) [0, 1, 2] has no positive",
            "text": "is not a .npz archive"}[case] in line
    assert not list((tmp_path / "out").rglob("*.array_record*"))  # nothing half written
