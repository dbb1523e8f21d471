"""Scene record codec: exact round trips, view subsets, and every BadRecordError reason."""
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines import records
from data_pipelines.records import BadRecordError
from data_pipelines.scene import QAPair, Scene


def _scene(views: int = 3, h: int = 12, w: int = 16) -> Scene:
    rng = np.random.default_rng(0)
    k = np.array([[20.0, 0, (w - 1) / 2], [0, 21.0, (h - 1) / 2], [0, 0, 1]], np.float32)
    angles = np.linspace(0, 0.6, views)
    c2w = np.tile(np.eye(4, dtype=np.float32), (views, 1, 1))
    cos, sin = np.cos(angles), np.sin(angles)
    c2w[:, 0, 0], c2w[:, 0, 2], c2w[:, 2, 0], c2w[:, 2, 2] = cos, sin, -sin, cos  # rotations about y
    c2w[:, :3, 3] = rng.normal(size=(views, 3))
    depth = rng.uniform(0.5, 9.0, (views, h, w)).astype(np.float32)
    depth[:, 0, :3] = 0  # a few "no value" pixels
    qa = (QAPair("How far?", "1.25", "numeric", "depth", (), (2,), ((2, 3.0, 4.5, "X"),)),
          QAPair("Which?\nA. a\nB. b", "B", "choice", "closer", ("A. a", "B. b"), (0, 1), ()))
    return Scene("s0", "unit", rng.integers(0, 256, (views, h, w, 3), dtype=np.uint8), depth,
                 np.repeat(k[None], views, 0), c2w, z_far=9.5, normal_loss=False, qa=qa)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_round_trip_is_exact():
    scene = _scene()
    back = records.record_to_scene(records.scene_to_record(scene))
    for field in ("images", "depth", "intrinsics", "c2w"):
        np.testing.assert_array_equal(getattr(back, field), getattr(scene, field))
        assert getattr(back, field).dtype == getattr(scene, field).dtype
    assert (back.scene_id, back.dataset, back.z_far, back.normal_loss, back.qa) == \
        (scene.scene_id, scene.dataset, scene.z_far, scene.normal_loss, scene.qa)


def test_png16_depth_is_exact_for_millimetres_and_refuses_other_values():
    scene = _scene()
    mm = np.random.default_rng(1).integers(0, 60000, scene.depth.shape).astype(np.uint16)
    scene = dataclasses.replace(scene, depth=mm.astype(np.float32) * np.float32(0.001))
    back = records.record_to_scene(records.scene_to_record(scene, depth_codec="png16", depth_scale=0.001))
    np.testing.assert_array_equal(back.depth, scene.depth)
    with pytest.raises(ValueError, match="f32_zlib"):
        records.scene_to_record(_scene(), depth_codec="png16", depth_scale=0.001)  # arbitrary floats
    with pytest.raises(ValueError, match="depth codec"):
        records.scene_to_record(_scene(), depth_codec="exr")


def test_jpeg_images_are_close_not_exact():
    scene = _scene(h=32, w=32)
    smooth = np.broadcast_to(np.linspace(0, 255, 32, dtype=np.uint8)[None, None, :, None], scene.images.shape)
    scene = dataclasses.replace(scene, images=np.ascontiguousarray(smooth))
    back = records.record_to_scene(records.scene_to_record(scene, image_format="jpeg"))
    assert np.abs(back.images.astype(int) - scene.images).mean() < 3
    np.testing.assert_array_equal(back.depth, scene.depth)


def test_view_subset_decodes_only_those_views_and_renumbers_qa():
    scene = _scene()
    back = records.record_to_scene(records.scene_to_record(scene), views=[2, 0])
    np.testing.assert_array_equal(back.images, scene.images[[2, 0]])
    np.testing.assert_array_equal(back.c2w, scene.c2w[[2, 0]])
    assert len(back.qa) == 1  # the (0, 1) question needs view 1, which was not decoded
    assert back.qa[0].views == (0,) and back.qa[0].markers == ((0, 3.0, 4.5, "X"),)
    with pytest.raises(ValueError, match="subset"):
        records.record_to_scene(records.scene_to_record(scene), views=[3])


def _corrupt(record: dict, how: str) -> dict:
    r = dict(record)
    if how == "corrupt_image":
        r["images"] = [r["images"][0][:40]] + r["images"][1:]
    elif how == "corrupt_depth":
        r["depth"] = [b"not zlib"] + r["depth"][1:]
    elif how in ("nonfinite_depth_nan", "nonfinite_depth_inf", "negative_depth", "empty_depth"):
        value = {"nonfinite_depth_nan": np.nan, "nonfinite_depth_inf": np.inf, "negative_depth": -1.0}.get(how)
        depth = np.full((r["height"], r["width"]), 2.0, np.float32) if value is not None else \
            np.zeros((r["height"], r["width"]), np.float32)
        if value is not None:
            depth[3, 4] = value
        r["depth"] = r["depth"][:1] + [records.encode_depth(depth)] + r["depth"][2:]
    elif how == "singular_pose":
        r["c2w"] = r["c2w"].copy()
        r["c2w"][1, :3, :3] = 0
    elif how == "nonfinite_pose":
        r["c2w"] = r["c2w"].copy()
        r["c2w"][2, 0, 3] = np.nan
    elif how == "bad_intrinsics":
        r["intrinsics"] = r["intrinsics"].copy()
        r["intrinsics"][0, 0, 0] = 0
    elif how == "view_size_mismatch":
        r["images"] = r["images"][:2] + [_png(np.zeros((r["height"] + 2, r["width"], 3), np.uint8))]
    elif how == "view_size_mismatch_depth":
        r["depth"] = r["depth"][:2] + [records.encode_depth(np.ones((r["height"], r["width"] - 1), np.float32))]
    elif how == "view_count_mismatch":
        r["images"] = r["images"][:2]
    elif how == "missing_field":
        del r["c2w"]
    elif how == "bad_qa":
        r["qa"] = dict(r["qa"], views=['[0, 7]', r["qa"]["views"][1]])
    return r


@pytest.mark.parametrize("how, reason", [
    ("corrupt_image", "corrupt_image"), ("corrupt_depth", "corrupt_depth"),
    ("nonfinite_depth_nan", "nonfinite_depth"), ("nonfinite_depth_inf", "nonfinite_depth"),
    ("negative_depth", "negative_depth"), ("empty_depth", "empty_depth"),
    ("singular_pose", "singular_pose"), ("nonfinite_pose", "nonfinite_pose"), ("bad_intrinsics", "bad_intrinsics"),
    ("view_size_mismatch", "view_size_mismatch"), ("view_size_mismatch_depth", "view_size_mismatch"),
    ("view_count_mismatch", "view_count_mismatch"), ("missing_field", "missing_field"), ("bad_qa", "bad_qa"),
])
def test_bad_records_raise_with_their_reason(how, reason):
    record = records.scene_to_record(_scene())
    record["qa"] = {k: [q[k] for q in record["qa"]] for k in record["qa"][0]}  # the layout tfds returns
    records.record_to_scene(record)  # the untouched record decodes
    with pytest.raises(BadRecordError) as err:
        records.record_to_scene(_corrupt(record, how), strict=True)
    assert err.value.reason == reason and err.value.record_id == "s0"
    assert reason in records.REASONS


def test_non_strict_zeroes_bad_depth_pixels_and_keeps_empty_views():
    record = records.scene_to_record(_scene())
    for how in ("nonfinite_depth_nan", "negative_depth", "empty_depth"):
        scene = records.record_to_scene(_corrupt(record, how), strict=False)
        assert np.all(np.isfinite(scene.depth)) and scene.depth.min() == 0
        assert scene.depth[1, 3, 4] == 0
    with pytest.raises(BadRecordError, match="singular_pose"):
        records.record_to_scene(_corrupt(record, "singular_pose"), strict=False)


def test_vqa_sample_round_trip_and_validation():
    rng = np.random.default_rng(0)
    sample = records.VQASample("v0", "llava", (rng.integers(0, 256, (10, 14, 3), dtype=np.uint8),
                                               rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)),
                               (("user", "What is shown?"), ("assistant", "Noise.")))
    back = records.record_to_vqa(records.vqa_to_record(sample, image_format="png"))
    assert back.turns == sample.turns and back.sample_id == "v0"
    for a, b in zip(back.images, sample.images):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="roles"):
        records.vqa_to_record(dataclasses.replace(sample, turns=(("user", "hi"),)))
    bad = records.vqa_to_record(sample, image_format="png")
    bad["images"] = [b"junk"]
    with pytest.raises(BadRecordError, match="corrupt_image"):
        records.record_to_vqa(bad)
