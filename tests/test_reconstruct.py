"""`g2vlm reconstruct` and `g2vlm chat`: files parsed back, GT through the writer, a trained checkpoint."""
import json
import pathlib

import numpy as np
from matplotlib import colormaps
import pytest
import trimesh
from PIL import Image

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import cli, geometry
from g2vlm_jax.inference import generate as gen
from g2vlm_jax.inference import load, reconstruct
from g2vlm_jax.tokenizer import load_tokenizer

ROOM = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "pi3_room"


@pytest.fixture(scope="module")
def room():
    z = np.load(ROOM / "condition.npz", allow_pickle=False)
    images = np.stack([np.asarray(Image.open(ROOM / "rgb" / f"{i}.png").convert("RGB")) for i in range(8)])
    return images, z["depths"].astype(np.float64), z["poses"].astype(np.float64), z["intrinsics"].astype(np.float64)


def test_oracle_geometry_through_the_writer_matches_the_fixture(room, tmp_path):
    images, depth, c2w, k = room
    world = geometry.depth_to_world_points(depth, k, c2w)
    local = geometry.depth_to_camera_points(depth, k)
    local[depth <= 0] = np.nan  # "no value" pixels: the writer must drop them
    recovered_k = geometry.recover_intrinsics(local)
    np.testing.assert_allclose(recovered_k, k, rtol=1e-6, atol=1e-6)
    names = [f"{i}.png" for i in range(8)]
    cameras = reconstruct.write_reconstruction(tmp_path, images, np.where(np.isnan(local), np.nan, world),
                                               local[..., 2], c2w, recovered_k, names)
    valid = depth > 0
    cloud = trimesh.load(tmp_path / "points.ply")
    points, colors = np.asarray(cloud.vertices), np.asarray(cloud.colors)[:, :3]
    assert cameras["num_points"] == len(points) == int(valid.sum())
    assert cameras["dropped_points"] == int((~valid).sum()) > 0
    np.testing.assert_allclose(points, world[valid].astype(np.float32), atol=1e-5)
    np.testing.assert_array_equal(colors, images[valid])
    written = json.loads((tmp_path / "cameras.json").read_text())
    np.testing.assert_allclose(np.array([v["c2w"] for v in written["views"]]), c2w, atol=1e-12)
    np.testing.assert_allclose(np.array([v["intrinsics"] for v in written["views"]]), k, rtol=1e-6)
    assert [v["image"] for v in written["views"]] == names
    for i in (0, 7):
        png = np.asarray(Image.open(tmp_path / "depth" / f"{i:04d}.png"))
        assert png.dtype == np.uint16 and png.shape == depth[i].shape
        np.testing.assert_array_equal(png, np.round(np.where(valid[i], depth[i], 0) * 1000).astype(np.uint16))
        np.testing.assert_allclose(np.load(tmp_path / "depth" / f"{i:04d}.npy"), np.where(valid[i], depth[i], 0),
                                   atol=1e-6)
        # The viewable preview: RGB, black where there is no depth, the nearest pixel at the colour map's
        # near end and the farthest at its far end (one scale for the scene: 2nd-98th percentile).
        preview = np.asarray(Image.open(tmp_path / "depth" / f"{i:04d}_preview.png"))
        assert preview.shape == depth[i].shape + (3,) and not preview[~valid[i]].any()
        assert len(np.unique(preview[valid[i]].reshape(-1, 3), axis=0)) > 20  # a real gradient, not a flat image
    ends = (np.asarray(colormaps["turbo"]([0.0, 1.0]))[:, :3] * 255).round()
    for end, pixel in zip(ends, (np.argmin(np.where(valid, depth, np.inf)), np.argmax(np.where(valid, depth, -np.inf)))):
        v, y, x = np.unravel_index(pixel, depth.shape)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "depth" / f"{v:04d}_preview.png"))[y, x], end)
    scene = trimesh.load(tmp_path / "scene.glb")
    clouds = [g for g in scene.geometry.values() if isinstance(g, trimesh.PointCloud)]
    assert len(clouds) == 1 and len(clouds[0].vertices) == len(points)
    assert sum(1 for name in scene.geometry if "camera" in name) == 8
    # Each frustum's apex is its camera centre.
    seg = reconstruct.frustum_segments(c2w[3], k[3], 350, 434, 0.5)
    np.testing.assert_allclose(seg[:4, 0], np.repeat(c2w[3][None, :3, 3], 4, 0))


def test_reconstruct_cli_with_a_trained_checkpoint(tiny_trained_run, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["reconstruct", "--checkpoint", str(tiny_trained_run), "--images", str(ROOM / "rgb"),
                     "--out", str(out), "--width", "56"]) == 0
    cameras = json.loads((out / "cameras.json").read_text())
    views = cameras["views"]
    assert len(views) == 8 and (views[0]["width"], views[0]["height"]) == (56, 42)
    assert [v["image"] for v in views] == [f"{i}.png" for i in range(8)]
    cloud = trimesh.load(out / "points.ply")
    points, colors = np.asarray(cloud.vertices), np.asarray(cloud.colors)[:, :3]
    assert len(points) == cameras["num_points"] and cameras["num_points"] + cameras["dropped_points"] == 8 * 56 * 42
    assert np.isfinite(points).all() and len(points) > 0
    # Each point is coloured by its pixel: the room's many colours, not one fill colour.
    assert colors.shape == points.shape and len(np.unique(colors, axis=0)) > 100
    for v in views:
        r = np.array(v["c2w"])[:3, :3]
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-4)
        assert np.isfinite(v["intrinsics"]).all()
    depth = np.load(out / "depth" / "0005.npy")
    assert depth.shape == (42, 56) and depth.dtype == np.float32
    assert np.asarray(Image.open(out / "depth" / "0005.png")).dtype == np.uint16
    assert len(trimesh.load(out / "scene.glb").geometry) == 9


def test_reconstruct_writes_a_colmap_model_colmap_reads(room, tmp_path):
    """The sparse model of `write_reconstruction` read by COLMAP's own reader (pycolmap), binary and text:
    the cameras and poses of cameras.json, and every point projects to the pixel it is recorded at."""
    pycolmap = pytest.importorskip("pycolmap", reason="pycolmap is in the test extras: pip install -e '.[test]'")
    images, depth, c2w, k = room
    world = geometry.depth_to_world_points(depth, k, c2w)
    world[depth <= 0] = np.nan
    names = [f"{i}.png" for i in range(8)]
    reconstruct.write_reconstruction(tmp_path, images, world, depth, c2w, k, names)
    for read in ("read_binary", "read_text"):
        model = pycolmap.Reconstruction()
        getattr(model, read)(str(tmp_path / "sparse" / "0"))
        assert len(model.images) == 8 and len(model.cameras) == 8
        assert 0 < len(model.points3D) <= 200_000 and model.compute_num_observations() == len(model.points3D)
        for image in model.images.values():
            i = names.index(image.name)
            cam_from_world = image.cam_from_world().matrix()
            np.testing.assert_allclose(cam_from_world, np.linalg.inv(c2w[i])[:3], atol=1e-6)  # float32 poses
            fx, fy, cx, cy = model.cameras[image.camera_id].params
            np.testing.assert_allclose([fx, fy, cx - 0.5, cy - 0.5], [k[i][0, 0], k[i][1, 1], k[i][0, 2], k[i][1, 2]])
        for point_id in list(model.points3D)[::997]:
            point = model.points3D[point_id]
            element = point.track.elements[0]
            image = model.images[element.image_id]
            uv = model.cameras[image.camera_id].img_from_cam(image.cam_from_world() * point.xyz)
            np.testing.assert_allclose(uv, image.points2D[element.point2D_idx].xy, atol=1e-3)  # pixels
            row, col = (int(c) for c in np.floor(image.points2D[element.point2D_idx].xy[::-1]))
            np.testing.assert_array_equal(point.color, images[names.index(image.name), row, col])


def test_reconstruct_rejects_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .png"):
        reconstruct.list_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png cannot be decoded"):
        reconstruct.load_images(reconstruct.list_images(tmp_path), 56)
    with pytest.raises(FileNotFoundError, match="is none of these; expected a training run directory .* or a params-only"):
        load.load_model(tmp_path)


def test_chat_cli_and_params_only_checkpoint(tiny_trained_run, tmp_path, capsys):
    cfg, model = load.load_model(tiny_trained_run)
    # The same weights as a params-only checkpoint load to the same model.
    from flax import nnx

    params = ckpt_lib.flat_params(nnx.state(model, nnx.Param))
    ckpt_lib.save_params(tmp_path / "params_only", params, ckpt_lib.run_metadata(cfg))
    _, again = load.load_model(tmp_path / "params_only")
    theirs = ckpt_lib.flat_params(nnx.state(again, nnx.Param))
    assert theirs.keys() == params.keys()
    for name in params:
        np.testing.assert_array_equal(np.asarray(theirs[name]), np.asarray(params[name]), err_msg=name)
    # Chat over geometry frames (this model has no ViT): the CLI prints the greedy answer.
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in (0, 4):
        Image.open(ROOM / "rgb" / f"{i}.png").save(frames / f"{i}.png")
    question = "How many chairs are there?"
    assert cli.main(["chat", "--checkpoint", str(tmp_path / "params_only"), "--frames", str(frames),
                     "--question", question, "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    tok = load_tokenizer(cfg.data.tokenizer)
    geo = reconstruct.load_images(reconstruct.list_images(frames), cfg.data.image_size[1]).astype(np.float32) / 255
    expected = gen.generate(again, tok, [gen.Prompt(question, geo, np.zeros((0, 28, 28, 3), np.float32))],
                            max_new_tokens=4).texts[0]
    assert printed == expected + "\n"
    # Semantic images for a reconstruction-only model: one line saying what to do instead.
    assert cli.main(["chat", "--checkpoint", str(tmp_path / "params_only"), "--images", str(frames / "0.png"),
                     "--question", question]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained for reconstruction only" in err and "tiny_synthetic.py:qa" in err


def test_eval_command_on_a_params_only_checkpoint(tiny_trained_run, tmp_path):
    """`g2vlm eval` accepts exported/converted weights and reports what the run directory reports."""
    import dataclasses

    from flax import nnx

    from g2vlm_jax import evaluation

    cfg, model = load.load_model(tiny_trained_run)
    ckpt_lib.save_params(tmp_path / "weights", ckpt_lib.flat_params(nnx.state(model, nnx.Param)),
                         ckpt_lib.run_metadata(cfg))
    experiment = str(pathlib.Path(__file__).resolve().parents[1] / "experiments/tiny_synthetic.py:test")
    assert cli.main(["eval", "--experiment", experiment, "--set", f"workdir={tmp_path / 'work'}",
                     "--checkpoint", str(tmp_path / "weights")]) == 0
    # The export stays as written; the report goes to the experiment's run directory.
    assert not (tmp_path / "weights" / "eval").exists()
    from_params = json.loads((tmp_path / "work" / "eval" / "report.json").read_text())["reconstruction"]
    from_run = evaluation.evaluate_checkpoint(dataclasses.replace(cfg, workdir=str(tiny_trained_run)),
                                              tiny_trained_run)["reconstruction"]
    assert from_params["num_samples"] == from_run["num_samples"] > 0
    assert from_params["vg_loss"] == pytest.approx(from_run["vg_loss"], rel=1e-6)


def test_images_of_another_aspect_ratio_are_named(tmp_path, caplog):
    """Every image takes the first one's size (the official loader's rule); one of another aspect ratio is
    stretched, which the user is told, naming it."""
    from PIL import Image

    for name, size in (("0.png", (80, 60)), ("1.png", (160, 120)), ("2.png", (60, 80))):
        Image.new("RGB", size, (120, 30, 200)).save(tmp_path / name)
    with caplog.at_level("WARNING"):
        images = reconstruct.load_images(reconstruct.list_images(tmp_path), 56)
    assert images.shape == (3, 42, 56, 3)
    assert "1 of 3 images have another aspect ratio than the first (0.png 80x60), e.g. 2.png 60x80" in caplog.text
