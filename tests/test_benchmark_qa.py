"""Spatial-QA suites (evaluation/benchmarks/qa_suites.py) on tiny question files the tests write in
the released formats: VSI-Bench (test-*.parquet + <dataset>/<scene>.mp4), SPAR-Bench
(data/test-*.parquet with embedded images), MindCube (raw/MindCube_tinybench.jsonl + image files),
OmniSpatial (data.json + <task_type>/<n>.png). A scripted predictor answers in the messy forms
models produce; the expected scores are computed by hand in the comments."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from g2vlm_jax.evaluation.benchmarks import qa_common, qa_suites
from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError
from g2vlm_jax.metrics import vqa
from tests.benchmark_fixtures import (MINDCUBE_QUESTIONS, SPAR_QUESTIONS, VSI_QUESTIONS, write_mindcube,
                                      write_omnispatial, write_sparbench, write_vsibench)


class ScriptedPredictor:
    """Answers with the text scripted for the first key found in the prompt; records what it saw."""

    def __init__(self, script: dict[str, str]):
        self.script, self.seen = script, []

    def answer(self, question, images, max_new_tokens=32):
        self.seen.append((question, images, max_new_tokens))
        return next(text for key, text in self.script.items() if key in question)

    def reconstruct(self, images):
        raise AssertionError("QA suites never reconstruct")

    def input_size(self, height, width):
        return height, width


def _run(suite, predictor, root):
    rows = [r for unit in suite.units(root) for r in suite.evaluate(predictor, root, unit)]
    return rows, suite.summarize(rows)


# --------------------------------------------------------------------------------------------------
# VSI-Bench
# --------------------------------------------------------------------------------------------------
def test_vsibench_prompts_frames_scores_and_table(tmp_path, monkeypatch):
    write_vsibench(tmp_path)
    decoded = []
    monkeypatch.setattr(qa_suites, "video_frames", lambda path, n: decoded.append(path.name) or
                        qa_common.video_frames(path, n))
    suite = qa_suites.VSIBench(num_frames=4)
    assert suite.units(tmp_path) == ["arkitscenes/scene0", "scannet/scene1"]  # one unit per video
    predictor = ScriptedPredictor({q: a for _, q, _, _, a, _, _ in VSI_QUESTIONS})
    rows, table = _run(suite, predictor, tmp_path)
    assert decoded == ["scene0.mp4", "scene1.mp4"]  # each video decoded once for all its questions
    assert json.loads(json.dumps(rows)) == rows
    by_id = {r["id"]: r for r in rows}
    assert [by_id[str(k + 1)]["score"] for k in range(7)] == pytest.approx([s for *_, s, _ in VSI_QUESTIONS])
    assert [by_id[str(k + 1)]["score_official"] for k in range(7)] == pytest.approx([o for *_, o in VSI_QUESTIONS])
    seen = {prompt.split("\n")[1][:2]: (prompt, frames, tokens) for prompt, frames, tokens in predictor.seen}
    assert seen["Q1"][0] == ("These are frames of a video.\nQ1 where is the sofa?\nOptions:\nA. left\nB. right\n"
                             "Answer with the option's letter from the given choices directly.")
    assert seen["Q2"][0] == ("These are frames of a video.\nQ2 where is the bed?\nOptions:\nA. left\n"
                             "B. chair\nC. back\nAnswer with the option's letter from the given choices directly.")
    assert seen["Q4"][0].endswith("Q4 how far?\nPlease answer the question using a single word or phrase.")
    assert seen["Q1"][2] == 16
    # 20 frames, 4 wanted: linspace(0, 19, 4) -> 0, 6, 12, 19 (truncated); the 3-frame video gives all 3
    levels = [float(np.mean(f)) / 10 for f in seen["Q1"][1]]
    assert np.round(levels).tolist() == [0, 6, 12, 19]
    assert len(seen["Q2"][1]) == 3
    # robust: rel_direction = mean(1, 1, 1); overall = mean(count 100, dist 60, room 100, dir 100, route 0);
    # official first word: dir = mean(0, 0, 1) = 33.3, dist 0 -> overall = mean(100, 0, 100, 33.3, 0)
    assert table == {"VSI-Bench": pytest.approx({
        "Overall": 72.0, "object_counting": 100.0, "object_abs_distance": 60.0, "room_size_estimation": 100.0,
        "object_rel_direction": 100.0, "route_planning": 0.0,
        qa_suites.VSI_OFFICIAL_OVERALL: (100 + 0 + 100 + 100 / 3 + 0) / 5})}
    assert json.loads(json.dumps(suite.protocol())) == {"questions_per_unit": "one video", "max_new_tokens": 16,
                                                        "num_frames": 4, "frame_sampling": "linspace(0, n-1, N) as int",
                                                        "parsing": suite.protocol()["parsing"]}


def test_vsibench_malformed_files_name_the_file(tmp_path):
    write_vsibench(tmp_path)
    table = pq.read_table(tmp_path / "test-00000-of-00001.parquet").drop_columns(["ground_truth"])
    pq.write_table(table, tmp_path / "test-00000-of-00001.parquet")
    with pytest.raises(DatasetLayoutError, match=r"test-00000-of-00001\.parquet: .*lacks field.*ground_truth"):
        qa_suites.VSIBench().units(tmp_path)
    (tmp_path / "test-00000-of-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetLayoutError, match=r"test-00000-of-00001\.parquet: not a readable parquet"):
        qa_suites.VSIBench().units(tmp_path)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage")
    with pytest.raises(DatasetLayoutError, match=r"broken\.mp4: not a decodable video"):
        qa_common.video_frames(tmp_path / "broken.mp4", 4)


def test_vsibench_unknown_type_and_bad_numeric_truth(tmp_path):
    bad = [("object_colour", "Q?", None, "red", "", 0, 0)]
    write_vsibench(tmp_path / "a", bad)
    with pytest.raises(DatasetLayoutError, match="unknown question_type 'object_colour'"):
        qa_suites.VSIBench().units(tmp_path / "a")
    write_vsibench(tmp_path / "b", [("object_counting", "Q?", None, "many", "", 0, 0)])
    with pytest.raises(DatasetLayoutError, match="answer 'many' is not a number > 0"):
        qa_suites.VSIBench().units(tmp_path / "b")
    write_vsibench(tmp_path / "c", [("route_planning", "Q?", ["A. x", "B. y"], "C", "", 0, 0)])
    with pytest.raises(DatasetLayoutError, match="question 1 has answer 'C', not an option letter A-B"):
        qa_suites.VSIBench().units(tmp_path / "c")


# --------------------------------------------------------------------------------------------------
# SPAR-Bench
# --------------------------------------------------------------------------------------------------
def test_sparbench_scores_levels_and_prompts(tmp_path):
    root = tmp_path / "spar"
    write_sparbench(root)
    predictor = ScriptedPredictor({q: a for _, q, _, a, _ in SPAR_QUESTIONS})
    rows, table = _run(qa_suites.SPARBench(), predictor, root)
    assert json.loads(json.dumps(rows)) == rows  # the runner writes rows as JSON
    assert [r["score"] for r in rows] == pytest.approx([s for *_, s in SPAR_QUESTIONS])
    assert predictor.seen[0][0] == "\nS1 depth of the lamp?\nPlease answer the question using a single word or phrase."
    assert predictor.seen[3][0].startswith("\nS4 which box? A. [1,2] B. [3,4]\nThe values represent the bounding box")
    assert [len(s[1]) for s in predictor.seen] == [1, 2, 1, 2, 1]
    assert predictor.seen[1][1][1].mean() == pytest.approx(41, abs=1)  # second embedded image of row 1
    # per task: 60, 100, 100, 0, 100 -> overall 72; Low = (60 + 100) / 2; Middle = (100 vci + 0) / 2; High 100
    assert table["SPAR-Bench"] == pytest.approx({
        "Overall": 72.0, "Low": 80.0, "Middle": 50.0, "High": 100.0, "depth_prediction_oc": 60.0,
        "depth_prediction_oc_mv": 100.0, "obj_spatial_relation_oo": 100.0, "position_matching": 0.0,
        "view_change_infer": 100.0})


def test_view_change_accuracy_by_hand():
    # right-left axis: gt 1, pred 2: |1 − 2| / |2| = 0.5 passes θ = 0.5 only (1/10); the other 4 axes exact
    assert vqa.view_change_accuracy("move_right:2.0,rotate_left:30", "move_right:1.0,rotate_left:30") == \
        pytest.approx((0.1 + 4) / 5)
    assert vqa.view_change_accuracy("I moved right", "move_right:1.0") == 0.0
    assert vqa.extract_numbers("from 1,200 to -3.5 or .5 m") == [1200.0, -3.5, 0.5]
    assert vqa.first_word("B. the chair") == "B" and vqa.first_word("The answer is B.") == "The"


def test_sparbench_malformed_rows_name_the_file(tmp_path):
    root = tmp_path / "spar"
    write_sparbench(root, [("view_change_infer", "S?", "turn a bit", "", 0)])
    with pytest.raises(DatasetLayoutError, match=r"test-00000-of-00001\.parquet: row spar0 view_change answer"):
        qa_suites.SPARBench().units(root)
    with pytest.raises(DatasetLayoutError, match="no SPAR-Bench parquet shard"):
        qa_suites.SPARBench().units(tmp_path / "elsewhere")


# --------------------------------------------------------------------------------------------------
# MindCube
# --------------------------------------------------------------------------------------------------
def test_mindcube_settings_and_answer_forms(tmp_path, monkeypatch):
    write_mindcube(tmp_path)
    monkeypatch.setattr(qa_common, "QUESTIONS_PER_UNIT", 2)
    suite = qa_suites.MindCube()
    assert suite.units(tmp_path) == ["q00000-00001", "q00002-00002"]  # fixed chunks in file order
    with pytest.raises(ValueError, match="unit 'q00002-00003' is not one of units"):
        suite.evaluate(ScriptedPredictor({}), tmp_path, "q00002-00003")
    predictor = ScriptedPredictor({q[:2]: a for _, q, _, a, _ in MINDCUBE_QUESTIONS})
    rows, table = _run(suite, predictor, tmp_path)
    assert [r["score"] for r in rows] == [s for *_, s in MINDCUBE_QUESTIONS]
    assert [len(s[1]) for s in predictor.seen] == [2, 3, 4]
    assert predictor.seen[0][0].endswith("A. Above B. Under C. Front\n" + qa_suites.MC_POST_PROMPT)
    assert table["MindCube"] == pytest.approx({"Overall": 200 / 3, "among": 100.0, "around": 100.0, "rotation": 0.0})


def test_mindcube_missing_image_and_bad_line_name_the_file(tmp_path):
    write_mindcube(tmp_path)
    missing = tmp_path / "other_all_image" / "around" / "around_group002_q3_1.jpg"
    missing.unlink()
    with pytest.raises(DatasetLayoutError, match=r"around_group002_q3_1\.jpg is missing: expected an RGB image"):
        qa_suites.MindCube().evaluate(ScriptedPredictor({"M": "A"}), tmp_path, "q00000-00002")
    with open(tmp_path / "raw" / "MindCube_tinybench.jsonl", "a") as f:
        f.write('{"id": "among_x", "question": "cut off\n')
    with pytest.raises(DatasetLayoutError, match=r"MindCube_tinybench\.jsonl:4: not valid JSON"):
        qa_suites.MindCube().units(tmp_path)


# --------------------------------------------------------------------------------------------------
# OmniSpatial
# --------------------------------------------------------------------------------------------------
def test_omnispatial_prompt_image_and_accuracy(tmp_path):
    write_omnispatial(tmp_path)
    predictor = ScriptedPredictor({"O1": "A", "O2": "Answer: B"})
    rows, table = _run(qa_suites.OmniSpatial(), predictor, tmp_path)
    assert [(r["ground_truth"], r["score"]) for r in rows] == [("A", 1.0), ("C", 0.0)]
    assert predictor.seen[1][0].endswith("O2 what is on my left?\nA. cup\nB. pen\nC. box\nD. bag")
    assert predictor.seen[1][1][0].mean() == pytest.approx(20)  # Perspective_Taking/1.png
    assert table["OmniSpatial"] == pytest.approx({"Overall": 50.0, "Dynamic_Reasoning": 100.0,
                                                  "Perspective_Taking": 0.0})


def test_omnispatial_answer_index_out_of_range(tmp_path):
    write_omnispatial(tmp_path, answer_of_second=4)
    with pytest.raises(DatasetLayoutError, match=r"data\.json: question 1_2 answer 4 is not an index"):
        qa_suites.OmniSpatial().units(tmp_path)
