"""Data glue of training and evaluation: this process's batches, and their assembly into global jax.Arrays.

Each JAX process builds only its own packs (data_pipelines.pipeline); the global batch is assembled
with `jax.make_array_from_process_local_data`, so no host ever holds or sends the whole batch.
"""
from __future__ import annotations

import jax

from data_pipelines import pipeline
from g2vlm_jax import config as config_lib
from g2vlm_jax import meeting
from g2vlm_jax.batch import PackedBatch


def prepare_sources(cfg: config_lib.ExperimentConfig, *, train: bool) -> None:
    """Builds datasets that are built on first use (the synthetic ones) on process 0 alone, then
    lets every process go on. Without this, processes sharing a run directory race to write the
    same tfds folder and all but one fail (tfds renames its temporary folder into place)."""
    if jax.process_count() == 1:
        return
    if jax.process_index() == 0:
        for source in cfg.data.sources if train else ():
            pipeline.open_source(source, cfg.data, "train", cfg.run_dir)
        for source in cfg.data.eval_sources:
            pipeline.open_source(source, cfg.data, cfg.data.eval_split, cfg.run_dir)
    meeting.wait("datasets prepared")  # a barrier, not a collective: building may take minutes


def make_train_iterator(cfg: config_lib.ExperimentConfig) -> pipeline.BatchIterator:
    """The step-indexed training iterator of this process (state: next step + skip counters)."""
    prepare_sources(cfg, train=True)
    return pipeline.make_train_iterator(cfg.data, cfg.run_dir, seed=cfg.data.seed, process_index=jax.process_index(),
                                        process_count=jax.process_count())


def eval_batches(cfg: config_lib.ExperimentConfig, num_batches: int) -> list[PackedBatch]:
    """Deterministic held-out batches of this process (split `data.eval_split`)."""
    prepare_sources(cfg, train=False)
    return pipeline.make_eval_batches(cfg.data, cfg.run_dir, num_batches, process_index=jax.process_index(),
                                      process_count=jax.process_count())


def to_global(batch: PackedBatch, sharding: jax.sharding.NamedSharding | None) -> PackedBatch:
    """Process-local numpy batch -> global jax.Arrays sharded along the batch axis (or one device)."""
    if sharding is None:
        return jax.tree_util.tree_map(jax.numpy.asarray, batch)
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
