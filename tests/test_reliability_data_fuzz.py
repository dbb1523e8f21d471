"""Property test: random corruptions of scene records through the batch pipeline.

Lenient mode never crashes, skips exactly the records it cannot repair (counted per reason) and
yields finite batches; strict mode raises a BadRecordError naming the first bad record it meets.
"""
import dataclasses
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipelines import pipeline, records
from data_pipelines.builders.base import SceneSource
from data_pipelines.synthetic.render import RenderConfig, render_scene
from g2vlm_jax import config as C

NUM_RECORDS = 6
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _truncate_image(r):
    r["images"][0] = r["images"][0][: len(r["images"][0]) // 3]


def _garbage_image(r):
    r["images"][1] = b"\x89PNG not really"


def _nan_depth(r):
    depth = records.decode_depth(r["depth"][0], r["depth_codec"], float(r["depth_scale"]), (r["height"], r["width"]))
    depth[:4] = np.nan
    r["depth"][0] = records.encode_depth(depth)


def _garbage_depth(r):
    r["depth"][1] = b"zlib? no"


def _nan_pose(r):
    r["c2w"] = r["c2w"].copy()
    r["c2w"][0, 0, 3] = np.nan


def _singular_pose(r):
    r["c2w"] = r["c2w"].copy()
    r["c2w"][1, :3, :3] = 0.0


def _zero_intrinsics(r):
    r["intrinsics"] = np.zeros_like(r["intrinsics"])


def _drop_field(r):
    del r["c2w"]


def _drop_view(r):
    r["images"] = r["images"][:-1]


def _bad_qa_views(r):
    r["qa"] = [{"question": "q", "answer": "1", "answer_type": "numeric", "task": "t", "choices": "[]",
                "views": "[99]", "markers": "[]"}]


# corruption -> the skip reason in lenient mode (None: repaired, the record is used)
CORRUPTIONS = {
    _truncate_image: "corrupt_image", _garbage_image: "corrupt_image", _nan_depth: None,
    _garbage_depth: "corrupt_depth", _nan_pose: "nonfinite_pose", _singular_pose: "singular_pose",
    _zero_intrinsics: "bad_intrinsics", _drop_field: "missing_field", _drop_view: "view_count_mismatch",
    _bad_qa_views: "bad_qa",
}


@pytest.fixture(scope="module")
def clean_records():
    cfg = RenderConfig(height=35, width=35, num_views=3)
    return [records.scene_to_record(render_scene("train", i, cfg).scene) for i in range(NUM_RECORDS)]


def _maker(recs, strict: bool) -> pipeline.BatchMaker:
    data = dataclasses.replace(C.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:test")).data, strict=strict,
                               packs_per_step=1, tokens_per_pack=64)
    source = C.DataSource(name="fuzz", kind="recon")
    return pipeline.BatchMaker(data, [(source, SceneSource(recs, strict=strict))], process_index=0, process_count=1,
                               augment=False, seed=0)


def _epoch(maker) -> tuple[list[dict], dict]:
    """Batches covering every record once (the first epoch of the permutation), and the skip counts."""
    slots_per_step = maker.local_packs * maker.max_slots
    steps = -(-NUM_RECORDS // slots_per_step)
    batches, skips = [], {}
    for step in range(steps):
        fields, counts = maker(step)
        batches.append(fields)
        for k, v in counts.items():
            skips[k] = skips.get(k, 0) + v
    return batches, skips


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.dictionaries(st.integers(0, NUM_RECORDS - 1), st.sampled_from(sorted(CORRUPTIONS, key=lambda f: f.__name__)),
                            min_size=1, max_size=NUM_RECORDS))
def test_random_corruptions(clean_records, plan):
    recs = [dict(r, images=list(r["images"]), depth=list(r["depth"])) for r in clean_records]
    for index, corrupt in plan.items():
        corrupt(recs[index])
    expected: dict = {}
    for corrupt in plan.values():
        if CORRUPTIONS[corrupt]:
            expected[CORRUPTIONS[corrupt]] = expected.get(CORRUPTIONS[corrupt], 0) + 1

    batches, skips = _epoch(_maker(recs, strict=False))
    bad_skips = {k: v for k, v in skips.items() if k in records.REASONS}
    assert bad_skips == expected
    for fields in batches:
        for name in ("geo_images", "gt_world_points", "gt_poses", "gt_intrinsics"):
            assert np.isfinite(fields[name]).all(), name
    used = sum(int(f["sample_valid"].sum()) for f in batches) + skips.get("pack_full", 0)
    assert used == NUM_RECORDS - sum(expected.values())

    with pytest.raises(records.BadRecordError) as raised:
        _epoch(_maker(recs, strict=True))
    named = int(raised.value.record_id.removeprefix("fuzz[").removesuffix("]"))
    assert named in plan, f"strict mode named record {named}, which is clean (corrupted: {sorted(plan)})"
