"""Grain pipeline: step-indexed batches (exact restore), disjoint processes, bad records counted or raised."""

import numpy as np
import pytest

from data_pipelines import pipeline
from data_pipelines.records import BadRecordError
from data_pipelines.synthetic.render import RenderConfig, render_scene
from g2vlm_jax import config as C


class _Scenes:
    """An in-memory scene source; indices in `bad` raise BadRecordError like a corrupt record."""

    def __init__(self, n, bad=()):
        self.scenes = [render_scene("train", i, RenderConfig(height=35, width=35, num_views=4)).scene for i in range(n)]
        self.bad = set(bad)

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        if i in self.bad:
            raise BadRecordError("corrupt_image", f"scene{i}")
        return self.scenes[i]


def _data(**kw):
    base = dict(image_size=(28, 28), view_buckets=(2, 3), min_views=2, max_views=3, tokens_per_pack=96,
                packs_per_step=2, augment=True, tokenizer="sentencepiece:builtin")
    base.update(kw)
    return C.DataConfig(**base)


@pytest.fixture(scope="module")
def scenes():
    return _Scenes(12)


def _maker(data, scenes, process_index=0, process_count=1):
    return pipeline.BatchMaker(data, [(C.DataSource(), scenes)], process_index=process_index,
                               process_count=process_count, augment=True, seed=3)


def test_restored_iterator_yields_the_same_batches(scenes):
    it = pipeline.BatchIterator(_maker(_data(), scenes))
    straight = [next(it) for _ in range(4)]
    it2 = pipeline.BatchIterator(_maker(_data(), scenes))
    next(it2), next(it2)
    state = it2.get_state()
    it3 = pipeline.BatchIterator(_maker(_data(), scenes))
    it3.set_state(state)
    for want, got in zip(straight[2:], [next(it3), next(it3)]):
        for name in ("token_ids", "positions", "geo_images", "gt_world_points", "sample_valid"):
            np.testing.assert_array_equal(getattr(want, name), getattr(got, name), err_msg=name)


def test_two_processes_see_disjoint_packs(scenes):
    data = _data(packs_per_step=4)
    whole, _ = _maker(data, scenes)(5)
    part0, _ = _maker(data, scenes, 0, 2)(5)
    part1, _ = _maker(data, scenes, 1, 2)(5)
    np.testing.assert_array_equal(np.concatenate([part0["geo_images"], part1["geo_images"]]), whole["geo_images"])
    assert not np.array_equal(part0["geo_images"], part1["geo_images"])
    with pytest.raises(ValueError, match="not divisible"):
        _maker(_data(packs_per_step=3), scenes, 0, 2)


def test_bad_records_are_counted_or_raised():
    bad = _Scenes(6, bad=range(6))  # every record corrupt
    it = pipeline.BatchIterator(_maker(_data(), bad))
    batch = next(it)
    assert not batch.sample_valid.any()
    assert it.skip_counts()["corrupt_image"] == batch.sample_valid.size
    strict = _maker(_data(strict=True), bad)
    with pytest.raises(BadRecordError) as err:
        strict(0)
    assert "synthetic[" in str(err.value)


def test_batches_follow_the_contract_and_view_buckets(scenes):
    from g2vlm_jax.batch import check_batch

    it = pipeline.BatchIterator(_maker(_data(), scenes))
    seen = set()
    for _ in range(6):
        b = next(it)
        check_batch(b)
        seen.add(b.geo_images.shape[2])
        assert b.sample_valid.any()
        valid = b.gt_valid[b.sample_valid]
        assert valid.mean() > 0.5 and np.isfinite(b.gt_world_points).all()
    assert seen <= {2, 3}


def test_fifty_steps_of_2_to_24_views_give_one_program_per_bucket():
    """50 steps drawing V in 2..24 (buckets 2, 4, 8, 16, 24): every batch field's shape and dtype is
    fixed by the step's bucket, so a jitted step compiles at most one program per bucket (counted
    with a jitted function of the whole batch, whose cache is keyed like the train step's)."""
    import jax

    buckets = (2, 4, 8, 16, 24)
    many_views = [render_scene("train", i, RenderConfig(height=35, width=35, num_views=24)).scene for i in range(4)]
    data = _data(view_buckets=buckets, min_views=2, max_views=24, tokens_per_pack=256, augment=False)
    maker = pipeline.BatchMaker(data, [(C.DataSource(), many_views)], process_index=0, process_count=1,
                                augment=False, seed=5)
    touch = jax.jit(lambda batch: sum(jax.numpy.sum(x.astype(jax.numpy.float32)) for x in jax.tree.leaves(batch)))
    views, avals = set(), set()
    for step in range(50):
        arrays, _ = maker(step)
        batch = pipeline.to_packed_batch(arrays)
        views.add(arrays["geo_images"].shape[2])
        avals.add(tuple((k, v.shape, str(v.dtype)) for k, v in sorted(arrays.items())))
        touch(batch)
    assert views <= set(buckets) and len(views) >= 3  # several buckets were drawn
    assert len(avals) == len(views)
    assert touch._cache_size() == len(views) <= len(buckets)


@pytest.mark.parametrize("label, colour, filled", [("X", (255, 0, 0), False), ("Y", (0, 0, 255), True),
                                                   ("blue", (0, 0, 255), True), ("green", (0, 200, 0), True),
                                                   ("A", (255, 0, 0), False)])
def test_markers_are_drawn_in_their_labels_style(label, colour, filled):
    """X a red ring, Y a filled blue disc (the two markers of a synthetic question must differ in more than a
    label the model cannot read at 56 px); SPAR colour labels in their colour; anything else a red ring."""
    image = np.full((56, 56, 3), 128, np.uint8)
    drawn = pipeline.draw_markers(image, [(0, 28.0, 40.0, label), (1, 10.0, 10.0, "Y")], view=0)
    r = round(56 / 14)
    assert tuple(drawn[40, 28 - r]) == colour  # on the ring / disc edge
    assert (tuple(drawn[40, 28]) == colour) == filled  # the centre: covered by a disc, seen through a ring
    assert np.array_equal(drawn[:20, :20], image[:20, :20])  # the other view's marker is not drawn here
