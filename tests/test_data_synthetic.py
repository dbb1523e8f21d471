"""Synthetic scenes: exact geometry, determinism, disjoint splits; spatial QA answers recomputed
independently from the scene parameters; the tfds builders read back without TensorFlow."""
import dataclasses
import re
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import consistency, convert, records
from data_pipelines.builders import SyntheticConfig, SyntheticSpatialQa, open_scenes
from data_pipelines.synthetic import QAConfig, RenderConfig, render_scene, synthetic_qa_scene

CFG = RenderConfig(height=48, width=64, num_views=6)


def _world_points(scene, v):
    """Unprojection written out here, independent of the library: float64[H, W, 3]."""
    h, w = scene.depth.shape[1:]
    k, pose = scene.intrinsics[v].astype(np.float64), scene.c2w[v].astype(np.float64)
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    rays = np.stack([(jj - k[0, 2]) / k[0, 0], (ii - k[1, 2]) / k[1, 1], np.ones((h, w))], -1)
    return (rays * scene.depth[v][..., None]) @ pose[:3, :3].T + pose[:3, 3]


def _surface_residual(p, obj):
    """Distance-like residual of points p float64[N, 3] from the surface of obj (0 on the surface)."""
    q = p - np.asarray(obj.center)
    if obj.shape == "sphere":
        return np.abs(np.linalg.norm(q, axis=1) - obj.extent[0])
    if obj.shape == "box":
        c, s = np.cos(obj.yaw), np.sin(obj.yaw)
        local = q @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        return np.abs(np.max(np.abs(local) / obj.extent, axis=1) - 1) * min(obj.extent)
    r, h = obj.extent[0], obj.extent[2]
    radial = np.hypot(q[:, 0], q[:, 1])
    side = np.abs(radial - r) + np.maximum(np.abs(q[:, 2]) - h, 0)
    cap = np.abs(np.abs(q[:, 2]) - h) + np.maximum(radial - r, 0)
    return np.minimum(side, cap)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_every_pixel_lies_on_the_surface_it_shows(index):
    rendered = render_scene("train", index, CFG)
    scene, layout = rendered.scene, rendered.layout
    scene.check()
    assert scene.depth.min() > 0 and np.all(np.isfinite(scene.depth))
    for v in range(scene.num_views):
        p = _world_points(scene, v).reshape(-1, 3)
        ids = rendered.object_ids[v].ravel()
        room = ids < 0
        on_room = np.min(np.abs(np.stack([np.abs(p[room, 0]) - layout.half_x, np.abs(p[room, 1]) - layout.half_y,
                                          p[room, 2], p[room, 2] - layout.room_height])), axis=0)
        assert on_room.max() < 1e-4
        for k, obj in enumerate(layout.objects):
            if np.any(ids == k):
                assert _surface_residual(p[ids == k], obj).max() < 1e-4, obj


def test_neighbouring_views_agree_by_reprojection():
    # Consecutive views of a trajectory overlap; wide-baseline pairs can be mostly occluded, and
    # occluded points (rightly) disagree, so the median is only meaningful for neighbours.
    for index in range(4):
        scene = render_scene("validation", index, CFG).scene
        for i in range(scene.num_views - 1):
            errors = consistency.reprojection_errors(scene, i, i + 1)
            assert errors.size > 0.2 * scene.depth[i].size and np.median(errors) < 1e-3


def test_reprojection_check_detects_wrong_pose_convention():
    scene = render_scene("train", 0, CFG).scene
    wrong = dataclasses.replace(scene, c2w=np.linalg.inv(scene.c2w).astype(np.float32))  # world-to-camera
    assert consistency.median_reprojection_error(scene) < 1e-4
    assert consistency.median_reprojection_error(wrong) > convert.WARN_REPROJECTION


def test_scenes_are_pure_functions_of_split_and_index():
    a, b = render_scene("train", 5, CFG).scene, render_scene("train", 5, CFG).scene
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.depth, b.depth)
    others = [render_scene(s, 5, CFG).scene for s in ("validation", "test")] + [render_scene("train", 6, CFG).scene]
    for other in others:
        assert not np.array_equal(a.c2w, other.c2w)
    full = render_scene("train", 5, RenderConfig(height=96, width=128, num_views=6)).scene
    np.testing.assert_allclose(full.c2w, a.c2w)  # the layout does not depend on the resolution
    with pytest.raises(ValueError, match="split"):
        render_scene("val", 0, CFG)


def test_intrinsics_vary_between_scenes_and_default_size_renders():
    fx = {float(render_scene("train", i, CFG).scene.intrinsics[0, 0, 0]) for i in range(4)}
    assert len(fx) == 4
    scene = render_scene("test", 0, RenderConfig()).scene  # 224 x 224 x 8, the stage-1a size
    assert scene.images.shape == (8, 224, 224, 3) and scene.images.std() > 10


# --------------------------------------------------------------------------------------------------
# Spatial QA, recomputed from the layout
# --------------------------------------------------------------------------------------------------
def _object(layout, name):
    matches = [o for o in layout.objects if o.name == name]
    assert len(matches) == 1, name
    return matches[0]


def _cam(c2w, point):
    c2w = np.asarray(c2w, np.float64)
    return np.linalg.inv(c2w)[:3] @ np.append(point, 1.0)


def _option(qa, letter):
    return next(c for c in qa.choices if c.startswith(letter + ". "))[3:]


def _check(qa, rendered):
    scene, layout = rendered.scene, rendered.layout
    marked = dict(re.findall(r"the (\w+ \w+) \(marked (\w)\)", qa.question))
    objs = {label: _object(layout, name) for name, label in marked.items()}
    if qa.task == "distance":
        expect = np.linalg.norm(np.subtract(objs["X"].center, objs["Y"].center))
        assert abs(float(qa.answer) - expect) <= 0.005 + 1e-9
    elif qa.task == "depth":
        assert abs(float(qa.answer) - _cam(scene.c2w[qa.views[0]], objs["X"].center)[2]) <= 0.005 + 1e-9
    elif qa.task == "closer":
        depth = {c[3:]: _cam(scene.c2w[qa.views[0]], _object(layout, c[7:]).center)[2] for c in qa.choices}
        assert _option(qa, qa.answer) == min(depth, key=depth.get)
    elif qa.task == "count":
        plural = re.search(r"How many (\w+)", qa.question).group(1)
        shape = {"boxes": "box", "spheres": "sphere", "cylinders": "cylinder"}[plural]
        assert int(qa.answer) == sum(o.shape == shape for o in layout.objects)
        # the one or two views asked about show every object counted (>= 12 pixels in one of them)
        members = [k for k, o in enumerate(layout.objects) if o.shape == shape]
        assert len(qa.views) <= 2 and all(any((rendered.object_ids[v] == k).sum() >= 12 for v in qa.views)
                                          for k in members)
    elif qa.task == "direction":
        a, b = (_cam(scene.c2w[qa.views[0]], objs[k].center) for k in "XY")
        dx, dz = b[0] - a[0], b[2] - a[2]
        expect = ("to the left of" if dx < 0 else "to the right of") if abs(dx) > abs(dz) else \
            ("in front of" if dz < 0 else "behind")
        assert _option(qa, qa.answer).startswith(expect)
    elif qa.task == "camera_motion":
        rel = np.linalg.inv(scene.c2w[qa.views[0]].astype(np.float64)) @ scene.c2w[qa.views[1]]
        text = _option(qa, qa.answer)
        if text.startswith("turned"):  # viewing direction of image 2 seen from image 1, about the vertical
            yaw = np.arctan2(rel[0, 2], rel[2, 2])
            assert text == ("turned right" if yaw > 0 else "turned left")
        else:
            dx, dz = rel[0, 3], rel[2, 3]
            expect = ("moved right" if dx > 0 else "moved left") if abs(dx) > abs(dz) else \
                ("moved forward" if dz > 0 else "moved backward")
            assert text == expect
    elif qa.task == "marker_row":  # the quarter of the image height that holds the marked pixel, top first
        row = (qa.markers[0][2] + 0.5) / scene.images.shape[1]
        assert min(abs(row - 0.25), abs(row - 0.75)) >= 0.03  # an augmentation crop cannot move it across
        assert qa.choices == ("A. top", "B. upper middle", "C. lower middle", "D. bottom")
        assert qa.answer == "ABCD"[int(row * 4)]
    elif qa.task == "marker_lower":  # the marked pixel lower in the image (larger row), X listed first
        (_, _, row_x, _), (_, _, row_y, _) = qa.markers
        assert abs(row_x - row_y) >= 0.1 * scene.images.shape[1]
        assert qa.choices == ("A. the point marked X", "B. the point marked Y")
        assert qa.answer == ("A" if row_x > row_y else "B")
    for view, u, v, label in qa.markers:  # a marker sits on its object: unproject it with the depth map
        p = _world_points(scene, view)[int(v), int(u)]
        on = [objs[label]] if label in objs else layout.objects  # marker_row/_lower do not name the object
        assert any(np.linalg.norm(p - o.center) <= np.linalg.norm(o.extent) + 1e-4 for o in on)


def test_spatial_qa_answers_match_the_scene_geometry():
    tasks = {}
    for index in range(12):
        rendered = synthetic_qa_scene("train", index, CFG)
        for qa in rendered.scene.qa:
            _check(qa, rendered)
            assert all(0 <= v < CFG.num_views for v in qa.views)
            if qa.answer_type == "choice":
                assert qa.answer in "ABCD" and f"\n{qa.answer}. " in qa.question
            tasks[qa.task] = tasks.get(qa.task, 0) + 1
    assert set(tasks) == {"distance", "depth", "closer", "count", "direction", "camera_motion", "marker_row",
                          "marker_lower"}
    assert min(tasks.values()) >= 6


def test_qa_scene_has_the_same_pixels_and_config_is_validated():
    plain, qa = render_scene("test", 3, CFG).scene, synthetic_qa_scene("test", 3, CFG).scene
    np.testing.assert_array_equal(plain.images, qa.images)
    assert qa.dataset == "synthetic_qa" and len(qa.qa) > 0
    only = synthetic_qa_scene("test", 3, CFG, QAConfig(tasks=("count",))).scene
    assert {q.task for q in only.qa} <= {"count"}
    with pytest.raises(ValueError, match="unknown tasks"):
        QAConfig(tasks=("height",))


def test_builder_writes_array_record_read_back_by_index(tmp_path, monkeypatch):
    cfg = SyntheticConfig(name="unit", height=28, width=42, num_views=3, num_scenes=(4, 2, 2))
    temp = tmp_path / "system_temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    builder = SyntheticSpatialQa(config=cfg, data_dir=str(tmp_path))
    builder.download_and_prepare()
    assert not list(temp.iterdir())  # tfds left an empty tmp*tfds directory per builder before LocalDatasetInfo
    assert list(tmp_path.glob("synthetic_spatial_qa/unit/1.1.0/*.array_record*"))
    source = tfds.data_source("synthetic_spatial_qa/unit", split="validation", data_dir=str(tmp_path))
    assert len(source) == 2
    for i in (1, 0):  # random access, record i is scene i
        scene = records.record_to_scene(source[i])
        direct = synthetic_qa_scene("validation", i, cfg.render, cfg.qa).scene
        np.testing.assert_array_equal(scene.images, direct.images)
        np.testing.assert_array_equal(scene.depth, direct.depth)
        np.testing.assert_array_equal(scene.c2w, direct.c2w)
        assert scene.qa == direct.qa and scene.scene_id == f"validation_{i:07d}"
    scenes = open_scenes("synthetic_spatial_qa/unit", split="train", data_dir=tmp_path)
    assert len(scenes) == 4 and scenes[3].images.shape == (3, 28, 42, 3)


def test_a_source_asks_the_families_it_lists():
    """DataSource.qa_tasks / qa_per_task / qa_fixed_order choose the questions of a synthetic_qa source (the
    tiny QA recipe's sources); another question set is another dataset, and an unknown family is refused by name."""
    from data_pipelines import pipeline
    from g2vlm_jax import config as C

    data = C.DataConfig(image_size=(28, 28), max_views=2)
    every = C.DataSource(name="synthetic_qa", kind="recon_qa", synthetic_scenes=(4, 2, 2))
    subset = dataclasses.replace(every, qa_tasks=("depth", "marker_row"), qa_per_task=3)
    every_cfg, subset_cfg = (pipeline.builder_name(s, data)[1]["config"] for s in (every, subset))
    assert every_cfg.name != subset_cfg.name and every_cfg.qa == QAConfig()
    tasks = [[q.task for q in synthetic_qa_scene("train", i, subset_cfg.render, subset_cfg.qa).scene.qa]
             for i in range(4)]
    assert {t for scene in tasks for t in scene} == {"depth", "marker_row"}
    assert max(scene.count("depth") for scene in tasks) == 3 and max(scene.count("marker_row") for scene in tasks) == 3
    fixed_cfg = pipeline.builder_name(dataclasses.replace(every, qa_fixed_order=("closer",)), data)[1]["config"]
    assert fixed_cfg.qa == QAConfig(fixed_order=("closer",)) and fixed_cfg.name not in (every_cfg.name, subset_cfg.name)
    with pytest.raises(ValueError, match=r"unknown tasks \['nearer'\]"):
        QAConfig(fixed_order=("nearer",))
    with pytest.raises(C.ConfigError, match=r"data.sources\[0\].qa_tasks.*unknown task families \['height'\]"):
        dataclasses.replace(every, qa_tasks=("height",)).validate("data.sources[0].")
    with pytest.raises(C.ConfigError, match=r"data.sources\[0\].qa_per_task"):
        dataclasses.replace(every, qa_per_task=0).validate("data.sources[0].")


def test_fixed_option_order_gives_each_letter_one_meaning():
    """QAConfig.fixed_order (tiny_synthetic:qa fixes closer's): closer lists the object marked X first,
    direction and camera_motion list their options in one order, and the answers still follow the geometry
    with more than one letter in use. By default every family shuffles (the built-in tokenizer's text)."""
    from data_pipelines.synthetic.spatial_qa import _DIRECTIONS, _MOVES, _TURNS

    letters, x_second = {}, 0
    for index in range(16):
        fixed = synthetic_qa_scene("train", index, CFG, QAConfig(fixed_order=("closer", "direction", "camera_motion")))
        for qa in fixed.scene.qa:
            _check(qa, fixed)
            letters.setdefault(qa.task, set()).add(qa.answer)
            names = dict((label, name) for name, label in re.findall(r"the (\w+ \w+) \(marked (\w)\)", qa.question))
            if qa.task == "closer":
                assert qa.choices == (f"A. the {names['X']}", f"B. the {names['Y']}")
            elif qa.task == "direction":
                assert qa.choices == tuple(f"{'ABCD'[i]}. {d} the {names['X']}" for i, d in enumerate(_DIRECTIONS))
            elif qa.task == "camera_motion":
                options = _MOVES if len(qa.choices) == 4 else _TURNS
                assert qa.choices == tuple(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
        shuffled = synthetic_qa_scene("train", index, CFG).scene.qa
        x_second += sum(q.task == "closer" and "(marked X)" in q.question and
                        re.search(r"the (\w+ \w+) \(marked X\)", q.question).group(1) not in q.choices[0]
                        for q in shuffled)
    assert all(len(letters[t]) >= 2 for t in ("closer", "direction", "camera_motion")), letters
    assert x_second > 0  # the default order is random
