"""Grain worker processes: batches with 2 workers equal the in-process batches for the same (seed, step),
and restoring the iterator state with workers continues exactly. (Workers take seconds to start.)"""
import numpy as np

from data_pipelines import pipeline
from data_pipelines.synthetic import RenderConfig, render_scene
from g2vlm_jax import config as C

FIELDS = ("token_ids", "token_type", "positions", "seq_order", "labels", "geo_images", "gt_world_points",
          "gt_valid", "gt_poses", "sample_valid", "sem_images")


def _maker():
    # A plain list of Scenes: the maker is pickled into the worker processes.
    scenes = [render_scene("train", i, RenderConfig(height=35, width=35, num_views=4)).scene for i in range(6)]
    data = C.DataConfig(image_size=(28, 28), view_buckets=(2, 3), min_views=2, max_views=3, tokens_per_pack=96,
                        packs_per_step=2, augment=True)
    return pipeline.BatchMaker(data, [(C.DataSource(), scenes)], process_index=0, process_count=1, augment=True,
                               seed=5)


def _assert_same(want, got):
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(want, name), getattr(got, name), err_msg=name)


def test_workers_yield_the_in_process_batches_and_restore_exactly():
    maker = _maker()
    straight = [next(it) for it in [pipeline.BatchIterator(maker)] for _ in range(4)]
    assert not np.array_equal(straight[0].geo_images, straight[1].geo_images)

    workers = pipeline.BatchIterator(maker, num_workers=2)
    for want in straight[:2]:
        _assert_same(want, next(workers))
    state = workers.get_state()
    assert state["step"] == 2
    del workers  # stops its worker process, which would otherwise keep prefetching beside the next one

    resumed = pipeline.BatchIterator(maker, num_workers=2)
    resumed.set_state(state)
    for want in straight[2:]:
        _assert_same(want, next(resumed))
    assert resumed.get_state()["step"] == 4
