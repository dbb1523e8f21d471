"""The geometry read-out of the spatial-QA report: the synthetic generator's answer rules applied to a
reconstruction, read at the marked pixels of the frames the model sees.

Given the true geometry, the read-out must answer as the generator did: the choice families exactly (its
rules are the generator's, with the dominant axis where the generator asked only clear cases) and the length
families up to the gap between an object's centre, which the generator measures, and the marked point on its
surface. Measured on 150 held-out scenes at the scenes' own 224 px: closer, direction, camera_motion 1.0, depth
MRA 0.85, distance 0.79; through the evaluator's 56 px frames (markers mapped into the crops), on 40 scenes:
the choice families 1.0, depth 0.85, distance 0.75.
"""
import collections

import numpy as np
import pytest

from data_pipelines import pipeline
from data_pipelines.synthetic import spatial_qa as qa_generator
from g2vlm_jax.evaluation import spatial_qa
from g2vlm_jax.inference import generate as gen
from g2vlm_jax.metrics import vqa

QA_CONFIG = qa_generator.QAConfig(fixed_order=("closer", "direction"))


def _score(qa, answer):
    return vqa.score_answer(answer, qa.answer, qa.answer_type, num_choices=len(qa.choices) or 26)


def _scenes(n):
    return [qa_generator.synthetic_qa_scene("validation", i, qa_cfg=QA_CONFIG).scene for i in range(n)]


def test_the_rules_on_the_true_geometry_give_the_generators_answers():
    scores = collections.defaultdict(list)
    for scene in _scenes(60):
        for qa in scene.qa:
            if qa.task not in qa_generator.GEOMETRY_TASKS:
                assert qa_generator.answer_from_geometry(qa, {}, None) is None
                continue
            w2c = np.linalg.inv(scene.c2w[qa.views[0]].astype(np.float64))
            marked = {}
            for view, u, v, label in qa.markers:  # the true point under the marked pixel, in image 1's camera
                local = scene.depth[view][int(v), int(u)] * np.linalg.solve(scene.intrinsics[view].astype(np.float64),
                                                                            [u, v, 1.0])
                c2w = scene.c2w[view].astype(np.float64)
                marked[label] = w2c[:3, :3] @ (c2w[:3, :3] @ local + c2w[:3, 3]) + w2c[:3, 3]
            motion = (qa_generator.relative_motion(scene.c2w[qa.views[0]], scene.c2w[qa.views[1]])
                      if len(qa.views) > 1 else None)
            scores[qa.task].append(_score(qa, qa_generator.answer_from_geometry(qa, marked, motion)))
    assert set(scores) == set(qa_generator.GEOMETRY_TASKS)
    for task in ("closer", "direction", "camera_motion"):
        assert np.mean(scores[task]) == 1.0, (task, scores[task])
    assert np.mean(scores["depth"]) > 0.75 and np.mean(scores["distance"]) > 0.7, scores
    assert min(len(s) for s in scores.values()) >= 40


def test_the_evaluator_reads_the_marked_pixels_of_its_frames():
    """A 'model' whose prefill geometry is the frames' true point maps and cameras: the evaluator's read-out
    (markers mapped into the 56 px crops, points read there, scale 1) answers as the generator did."""
    bucket = pipeline.Bucket(2, 56, 56)
    scores = collections.defaultdict(list)
    for i, scene in enumerate(_scenes(40)):
        for j, qa in enumerate(scene.qa):
            views, sem = pipeline.qa_inputs(scene, qa, bucket, (56, 56), np.random.default_rng([i, j]), augment=False)
            question = spatial_qa.EvalQuestion(gen.Prompt(qa.question, views.images, sem[None]), qa,
                                               spatial_qa._frame_markers(scene, qa, views), True)
            if not spatial_qa._readable(question):
                continue
            h, w = views.depth.shape[1:]
            pixels = np.stack([*np.meshgrid(np.arange(w), np.arange(h)), np.ones((h, w))], -1)  # (u, v, 1)
            rays = np.einsum("vij,hwj->vhwi", np.linalg.inv(views.intrinsics.astype(np.float64)), pixels)
            geometry = {"local_points": (rays * views.depth[..., None])[None, None],
                        "camera_poses": views.c2w.astype(np.float64)[None, None]}
            answer = qa_generator.answer_from_geometry(qa, *spatial_qa._marked_points(geometry, 0, question))
            scores[qa.task].append(_score(qa, answer))
    assert set(scores) == set(qa_generator.GEOMETRY_TASKS)
    for task in ("closer", "direction", "camera_motion"):
        assert np.mean(scores[task]) >= 0.95, (task, np.mean(scores[task]))
    assert np.mean(scores["depth"]) > 0.75 and np.mean(scores["distance"]) > 0.65, scores


def test_a_marker_outside_the_frames_is_left_out():
    scene = _scenes(1)[0]
    qa = next(q for q in scene.qa if q.task == "depth")
    views, _ = pipeline.qa_inputs(scene, qa, pipeline.Bucket(2, 56, 56), (56, 56), np.random.default_rng(0),
                                  augment=False)
    assert [m[0] for m in spatial_qa._frame_markers(scene, qa, views)] == [0]
    other = next(v for v in range(scene.num_views) if v not in views.frames)
    moved = qa.__class__(**{**qa.__dict__, "markers": ((other, 10.0, 10.0, "X"),)})
    assert spatial_qa._frame_markers(scene, moved, views) == ()


def test_the_readout_reports_beside_the_answers():
    records = [{"task": "closer", "answer_type": "choice", "score": 0.0, "prediction": "A", "readout_score": 1.0},
               {"task": "closer", "answer_type": "choice", "score": 1.0, "prediction": "B", "readout_score": 1.0},
               {"task": "count", "answer_type": "numeric", "score": 0.5, "prediction": "2"}]
    report = spatial_qa.score_report(records)
    assert report["per_task"]["closer"]["geometry_readout"] == pytest.approx(1.0)
    assert "geometry_readout" not in report["per_task"]["count"]
