"""VQA scoring: MRA (VSI-Bench), number and option-letter extraction, accuracy and per-answer scores."""
import numpy as np
import pytest

from g2vlm_jax.metrics import vqa


@pytest.mark.parametrize("pred,expected", [
    (10, 1.0), (13, 0.5), (7, 0.5), ("13", 0.5), ("about 7 metres", 0.5),
    (10.4, 1.0),   # rel 0.04 <= 0.05
    (10.6, 0.9),   # rel 0.06: fails only θ = 0.95
    (14.9, 0.1),   # rel 0.49: passes only θ = 0.5
    (16, 0.0), (-10, 0.0), ("no idea", 0.0), (None, 0.0), (float("nan"), 0.0),
])
def test_mean_relative_accuracy(pred, expected):
    assert vqa.mean_relative_accuracy(pred, 10.0) == pytest.approx(expected)


def test_mra_thresholds_are_vsi_bench():
    np.testing.assert_allclose(vqa.MRA_THRESHOLDS, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])


@pytest.mark.parametrize("gt", [0.0, -2.0, float("nan")])
def test_mra_rejects_non_positive_truth(gt):
    with pytest.raises(ValueError, match="gt must be a finite number > 0"):
        vqa.mean_relative_accuracy(1.0, gt)


@pytest.mark.parametrize("text,plain,metres", [
    ("2.37", 2.37, 2.37),
    ("1.5 m", 1.5, 1.5),
    ("about 2,300 mm", 2300.0, 2.3),
    ("It is 150cm away.", 150.0, 1.5),
    ("3 feet", 3.0, 0.9144),
    ("-0.5 meters", -0.5, -0.5),
    (".75", 0.75, 0.75),
    ("There are 4 chairs and 2 tables", 4.0, 4.0),
    ("2 in the corner", 2.0, 2.0),           # 'in' is not read as inches
    ("There are three chairs.", 3.0, 3.0),   # a number word when no digits
    ("one of them is 2 m away", 2.0, 2.0),   # digits win over words
    ("x2", None, None),                      # part of a word, not a number
    ("I don't know", None, None),
    ("", None, None),
])
def test_extract_number(text, plain, metres):
    got, got_m = vqa.extract_number(text), vqa.extract_number(text, to_metres=True)
    assert (got is None) == (plain is None) and (got_m is None) == (metres is None)
    if plain is not None:
        assert got == pytest.approx(plain) and got_m == pytest.approx(metres)


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("C) turned left", "C"), ("D: behind", "D"),
    ("Answer: C", "C"), ("The answer is (D) because it is nearer.", "D"), ("the correct option is B", "B"),
    ("b", "B"), ("(c)", "C"), ("answer: d.", "D"), ("Option a", "A"),
    ("A red box is closer, so B", "B"),      # the article 'A' is not an option
    ("I think C", "C"),                      # nor the pronoun 'I'
    ("A. the red box", "A"), ("A", "A"),
    ("the answer is a red box", None),       # lowercase letter used as a word
    ("E", None),                             # beyond the 4 options
    ("The red box is closer.", None),
    ("", None),
])
def test_extract_choice(text, expected):
    assert vqa.extract_choice(text, 4) == expected


def test_extract_choice_respects_num_choices():
    assert vqa.extract_choice("E", 5) == "E"
    assert vqa.extract_choice("The one marked X, so B", 4) == "B"
    with pytest.raises(ValueError, match="num_choices"):
        vqa.extract_choice("A", 0)
    with pytest.raises(ValueError, match="text must be a str"):
        vqa.extract_choice(None, 4)


def test_multiple_choice_accuracy():
    preds = ["A", "(B)", "Answer: C", "I am not sure", "d"]
    assert vqa.multiple_choice_accuracy(preds, ["A", "B", "D", "A", "D"], num_choices=4) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="2 pred_texts but 1 gt_letters"):
        vqa.multiple_choice_accuracy(["A", "B"], ["A"])
    with pytest.raises(ValueError, match="empty"):
        vqa.multiple_choice_accuracy([], [])
    with pytest.raises(ValueError, match="not an option letter"):
        vqa.multiple_choice_accuracy(["A"], ["left"])


def test_score_answer():
    assert vqa.score_answer("The answer is B.", "B", "choice", num_choices=4) == 1.0
    assert vqa.score_answer("C", "B", "choice", num_choices=4) == 0.0
    assert vqa.score_answer("13 m", "10.00", "numeric") == pytest.approx(0.5)
    assert vqa.score_answer("130 cm", "1.00", "numeric") == 0.0
    assert vqa.score_answer("130 cm", "1.00", "numeric", to_metres=True) == pytest.approx(0.5)
    assert vqa.score_answer("no number", 2.0, "numeric") == 0.0
    with pytest.raises(ValueError, match="answer_type"):
        vqa.score_answer("A", "A", "open")
    with pytest.raises(ValueError, match="holds no number"):
        vqa.score_answer("3", "many", "numeric")


def _mean_mra(pred, answers):
    return np.mean([vqa.mean_relative_accuracy(pred, a) for a in answers])


@pytest.mark.parametrize("answers", [[1, 1, 1, 2, 7], [1.23, 1.31, 4.8, 5.02, 5.1], [2.5], [0.8, 3.3, 3.4, 9.9, 12.0]])
def test_best_constant_number_is_the_best_two_decimal_constant(answers):
    best = vqa.best_constant_number(answers)
    assert best == round(best, 2) and min(answers) <= best <= max(answers)
    # Brute force with the scalar metric over every 2-decimal value in range: none scores higher.
    grid = np.round(np.arange(min(answers), max(answers) + 0.005, 0.01), 2)
    assert _mean_mra(best, answers) == pytest.approx(max(_mean_mra(g, answers) for g in grid))
    # ... and it is at least as good as the mean answer (the usual trivial baseline).
    assert _mean_mra(best, answers) >= _mean_mra(round(float(np.mean(answers)), 2), answers)


def test_best_constant_number_beats_the_mean_on_skewed_counts():
    # Counts: mostly 1, one outlier. The mean (2.4) is right for none; 1 is right for three of five.
    assert vqa.best_constant_number([1, 1, 1, 2, 7]) == 1.0
    assert _mean_mra(1.0, [1, 1, 1, 2, 7]) == pytest.approx(0.62) and _mean_mra(2.4, [1, 1, 1, 2, 7]) == pytest.approx(0.14)


@pytest.mark.parametrize("answers", [[], [1.0, 0.0], [1.0, float("nan")]])
def test_best_constant_number_rejects_bad_answers(answers):
    with pytest.raises(ValueError, match="best_constant_number"):
        vqa.best_constant_number(answers)
