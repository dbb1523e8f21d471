"""Over-long text: a QA sample whose question + answer exceed data.max_text_tokens is skipped, counted
under 'text_too_long' and logged; strict mode raises naming the record."""
import dataclasses
import functools
import logging

import pytest

from data_pipelines import pipeline
from data_pipelines.scene import QAPair
from data_pipelines.synthetic import RenderConfig, render_scene
from g2vlm_jax import config as C
from g2vlm_jax.batch import TOKEN_TEXT
from g2vlm_jax.tokenizer import load_tokenizer

SHORT, LONG = "How far apart are they?", "Describe the room " + "and the chair " * 40 + "please."


@functools.cache
def _rooms():
    return tuple(render_scene("train", i, RenderConfig(height=35, width=35, num_views=3)).scene for i in range(4))


def _scenes(long: set[int]):
    """4 scenes with one QA pair each; the scenes in `long` get the long question."""
    out = []
    for i, scene in enumerate(_rooms()):
        question = LONG if i in long else SHORT
        out.append(dataclasses.replace(scene, scene_id=f"room{i}", qa=(QAPair(question, "2.5", "numeric", "distance",
                                                                              views=(0, 1)),)))
    return out


def _maker(scenes, strict=False):
    data = C.DataConfig(sources=(C.DataSource(name="synthetic_qa", kind="recon_qa"),), image_size=(28, 28),
                        vit_image_size=(28, 28), view_buckets=(2,), min_views=2, max_views=2, tokens_per_pack=300,
                        packs_per_step=2, max_text_tokens=48, augment=False, strict=strict)
    return pipeline.BatchMaker(data, [(data.sources[0], scenes)], process_index=0, process_count=1, augment=False,
                               seed=0)


def test_budget_separates_the_two_questions():
    tok = load_tokenizer("sentencepiece:builtin")
    assert len(tok.encode(SHORT)) + len(tok.encode("2.5")) <= 48 < len(tok.encode(LONG))


def test_every_over_long_sample_is_skipped_counted_and_logged(caplog):
    it = pipeline.BatchIterator(_maker(_scenes({0, 1, 2, 3})))
    with caplog.at_level(logging.WARNING):
        batch = next(it)
    assert not batch.document_ids.any() and not batch.sample_valid.any()
    assert it.skip_counts() == {"text_too_long": batch.sample_valid.size}  # every slot drew a long record
    assert any("text_too_long" in r.getMessage() for r in caplog.records)


def test_only_over_long_samples_are_skipped():
    tok = load_tokenizer("sentencepiece:builtin")
    question = tok.encode(SHORT)
    it = pipeline.BatchIterator(_maker(_scenes({0, 2})))
    packed = 0
    for _ in range(3):
        batch = next(it)
        for b, row in enumerate(batch.token_ids):
            for doc in range(1, int(batch.document_ids[b].max()) + 1):
                ids = row[(batch.document_ids[b] == doc) & (batch.token_type[b] == TOKEN_TEXT)].tolist()
                assert any(ids[i:i + len(question)] == question for i in range(len(ids)))  # the short question
                packed += 1
    # The 3 steps draw 3 * 2 packs * 2 slots = 12 consecutive slots of the per-epoch permutations of
    # the 4 records: exactly half of them are long.
    assert batch.sample_valid.size == 4
    assert it.skip_counts() == {"text_too_long": 6} and packed == 6


def test_strict_mode_raises_naming_the_record():
    with pytest.raises(ValueError, match=r"synthetic_qa\[\d\] \(room[02]\): its text has \d+ tokens, more than "
                                         r"data.max_text_tokens=48"):
        _maker(_scenes({0, 2}), strict=True)(0)
    fields, skips = _maker(_scenes(set()), strict=True)(0)
    assert fields["sample_valid"].all() and skips == {}
