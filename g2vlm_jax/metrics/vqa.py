"""Spatial-VQA scoring (SPEC 5): option-letter accuracy for multiple choice, MRA for numeric answers.

Conventions (decided here, tested in tests/test_metrics_vqa.py):
- Scores are fractions in [0, 1] per question (1 = right); papers print them x100.
- MRA is VSI-Bench's mean relative accuracy: the mean over θ in linspace(0.50, 0.95, 10) of
  1[|ŷ - y| / y <= 1 - θ]. Boundaries are inclusive with a 1e-9 slack, so 13 or 7 for a truth of 10
  (relative error exactly 0.3) scores 0.5 regardless of floating-point rounding of the thresholds.
  A prediction with no number in it scores 0. The ground truth must be a finite number > 0.
- `extract_number` returns the first number in the text: digits first ("2,300" -> 2300, "-1.5",
  ".5"); only when the text has no digits, the first number word ("three" -> 3, zero to twenty).
  With `to_metres=True` a length unit right after the number converts it to metres
  ("150 cm" -> 1.5, "3 ft" -> 0.9144); a bare number is returned as written. "in" is never read
  as inches (too common as a preposition); write "inch"/"inches".
- `extract_choice` reads the option letter a model meant, in this order:
    1. an explicit marker: "Answer: C", "the answer is (B)", "Option D";
    2. a formatted letter: "(B)" anywhere, or "B." / "B)" / "B:" / "B" at the start;
    3. the first standalone capital letter among the options, where "A" and "I" followed by a
       lowercase word are read as English words ("A red box ...", "I think ..."), not options.
  Lowercase letters count only where they cannot be words: alone ("b", "(b)", "b."), or right after
  an explicit marker when followed by punctuation or the end ("answer: b").
  Letters outside the first `num_choices` options are ignored. No letter found -> None (scores 0).
- Benchmark-specific parsers (used by evaluation/benchmarks/qa_suites.py): `first_word` is the
  lmms-eval VSI-Bench / SPAR-Bench "fuzzy_matching" (first space-separated word, trailing dots
  dropped); `extract_numbers` lists every number (SPAR-Bench scores the last one of its
  multi-view tasks); `view_change_accuracy` is SPAR-Bench's view_change_infer score.
"""
from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

MRA_THRESHOLDS = np.linspace(0.50, 0.95, 10)
_MRA_SLACK = 1e-9  # keeps boundary cases (|ŷ-y|/y == 1-θ) counted as correct despite rounding

# A number: optional sign, then either digits with optional thousands groups and decimals, or ".5".
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?!\d)")
_NUMBER_WORDS = {w: float(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_UNIT_TO_METRES = {
    "km": 1000.0, "kilometre": 1000.0, "kilometres": 1000.0, "kilometer": 1000.0, "kilometers": 1000.0,
    "m": 1.0, "metre": 1.0, "metres": 1.0, "meter": 1.0, "meters": 1.0,
    "cm": 0.01, "centimetre": 0.01, "centimetres": 0.01, "centimeter": 0.01, "centimeters": 0.01,
    "mm": 0.001, "millimetre": 0.001, "millimetres": 0.001, "millimeter": 0.001, "millimeters": 0.001,
    "ft": 0.3048, "foot": 0.3048, "feet": 0.3048,
    "inch": 0.0254, "inches": 0.0254,
    "yd": 0.9144, "yard": 0.9144, "yards": 0.9144,
}
_UNIT = re.compile(r"\s*(" + "|".join(sorted(_UNIT_TO_METRES, key=len, reverse=True)) + r")\b", re.IGNORECASE)

_MARKER = re.compile(r"\b(?:answer|option|choice)\b(?:\s+is)?\s*[:\-]?\s*\(?([A-Za-z])\)?(?=[^A-Za-z0-9]|$)",
                     re.IGNORECASE)
_BRACKETED = re.compile(r"\(([A-Z])\)")
_LEADING = re.compile(r"^\s*\(?([A-Z])(?:[.):]|$|\s+(?![a-z]))")  # "B. ..." but not "A box ..."
_ALONE = re.compile(r"^\s*\(?([A-Za-z])\)?[.:]?\s*$")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def extract_number(text: str, to_metres: bool = False) -> float | None:
    """The first number in `text` (see module notes), or None when there is none.

    to_metres: convert by a length unit written right after the number ("150 cm" -> 1.5).
    """
    if not isinstance(text, str):
        raise ValueError(f"extract_number: text must be a str, got {type(text).__name__}")
    for match in _NUMBER.finditer(text):
        token = match.group(0)
        if not any(ch.isdigit() for ch in token):
            continue  # the pattern can match an empty string or a lone sign
        value = float(token.replace(",", ""))
        if to_metres:
            unit = _UNIT.match(text, match.end())
            if unit:
                value *= _UNIT_TO_METRES[unit.group(1).lower()]
        return value
    for word in re.findall(r"[A-Za-z]+", text):
        if word.lower() in _NUMBER_WORDS:
            return _NUMBER_WORDS[word.lower()]
    return None


def extract_numbers(text: str) -> list[float]:
    """Every number written with digits in `text`, in order (same rules as `extract_number`)."""
    if not isinstance(text, str):
        raise ValueError(f"extract_numbers: text must be a str, got {type(text).__name__}")
    return [float(m.group(0).replace(",", "")) for m in _NUMBER.finditer(text)
            if any(ch.isdigit() for ch in m.group(0))]


def first_word(text: str) -> str:
    """lmms-eval's VSI-Bench / SPAR-Bench `fuzzy_matching`: the text up to the first space, with
    trailing dots removed ("B. the chair" -> "B", "The answer is B." -> "The")."""
    return text.split(" ")[0].rstrip(".").strip()


# SPAR-Bench view_change_infer: signed amount along each axis = positive action - negative action.
_VIEW_CHANGE_AXES = (("move_right", "move_left"), ("move_up", "move_down"), ("move_forward", "move_backward"),
                     ("rotate_right", "rotate_left"), ("rotate_up", "rotate_down"))


def _view_change_amounts(text: str) -> list[float]:
    """'move_right:0.5,rotate_left:30' -> the five signed axis amounts; ValueError when malformed."""
    amounts = {}
    for item in text.split(","):
        key, value = item.split(":")
        amounts[key.strip()] = float(value)
    return [amounts.get(pos, 0.0) - amounts.get(neg, 0.0) for pos, neg in _VIEW_CHANGE_AXES]


def view_change_accuracy(pred_text: str, gt_text: str) -> float:
    """SPAR-Bench's view_change_infer score in [0, 1], as its lmms-eval task computes it: the mean
    over the five axes of a thresholded relative accuracy (thresholds MRA_THRESHOLDS) where the
    relative error divides by the *predicted* amount (|gt − pred| / |pred|; |gt − pred| when the
    prediction is 0), the argument order of the official code. Unparseable prediction -> 0.
    gt_text: 'action:amount,...' as released; a malformed one raises ValueError."""
    gt = _view_change_amounts(gt_text)
    try:
        pred = _view_change_amounts(pred_text)
    except ValueError:
        return 0.0
    scores = []
    for g, p in zip(gt, pred):
        error = abs(g - p) / abs(p) if p != 0 else abs(g - p)
        scores.append(np.mean(error <= 1.0 - MRA_THRESHOLDS + _MRA_SLACK))
    return float(np.mean(scores))


def mean_relative_accuracy(pred: float | str | None, gt: float) -> float:
    """VSI-Bench MRA of one numeric answer, in [0, 1].

    pred: a number, or model text (its first number is used); None or text without a number -> 0.
    gt: the true value, a finite number > 0 (relative error divides by it).
    """
    gt = float(gt)
    if not np.isfinite(gt) or gt <= 0:
        raise ValueError(f"mean_relative_accuracy: gt must be a finite number > 0, got {gt}")
    if isinstance(pred, str):
        pred = extract_number(pred)
    if pred is None or not np.isfinite(float(pred)):
        return 0.0
    rel_error = abs(float(pred) - gt) / gt
    return float(np.mean(rel_error <= 1.0 - MRA_THRESHOLDS + _MRA_SLACK))


def best_constant_number(answers) -> float:
    """The number, written to 2 decimals, whose mean MRA over `answers` (finite values > 0) is highest:
    the strongest answer a model that ignores the question's images can give to a numeric family.

    Searched over every 2-decimal value between the smallest and largest answer (a geometric grid of
    2,001 values when that range holds more); ties go to the smallest. answers: float[n].
    """
    gts = np.asarray(answers, np.float64)
    if gts.size == 0 or not np.all(np.isfinite(gts)) or gts.min() <= 0:
        raise ValueError("best_constant_number: answers must be a non-empty list of finite numbers > 0")
    lo, hi = gts.min(), gts.max()
    if (hi - lo) / 0.01 <= 2000:
        candidates = np.round(np.arange(round(lo, 2), round(hi, 2) + 0.005, 0.01), 2)
    else:
        candidates = np.unique(np.round(np.geomspace(lo, hi, 2001), 2))
    rel_error = np.abs(candidates[:, None] - gts[None, :]) / gts[None, :]  # [candidates, n]
    score = np.zeros(len(candidates))
    for threshold in MRA_THRESHOLDS:
        score += np.mean(rel_error <= 1.0 - threshold + _MRA_SLACK, axis=1)
    return float(candidates[int(np.argmax(score))])


def _option_letters(num_choices: int) -> str:
    if not 1 <= num_choices <= 26:
        raise ValueError(f"num_choices must be in 1..26 (option letters A-Z), got {num_choices}")
    return string.ascii_uppercase[:num_choices]


def extract_choice(text: str, num_choices: int) -> str | None:
    """The option letter ('A'...) that `text` answers with, or None (rules in the module notes)."""
    if not isinstance(text, str):
        raise ValueError(f"extract_choice: text must be a str, got {type(text).__name__}")
    letters = _option_letters(num_choices)
    alone = _ALONE.match(text)
    if alone and alone.group(1).upper() in letters:
        return alone.group(1).upper()
    for m in _MARKER.finditer(text):
        letter = m.group(1)
        after = text[m.end():].lstrip()
        explicit_lower = letter.islower() and (not after or after[0] in ".,;:!?)")
        if letter.upper() in letters and (letter.isupper() or explicit_lower):
            return letter.upper()
    for pattern in (_BRACKETED, _LEADING):
        m = pattern.search(text)
        if m and m.group(1) in letters:
            return m.group(1)
    for m in _STANDALONE.finditer(text):
        letter = m.group(1)
        if letter in ("A", "I") and re.match(r"\s+[a-z]", text[m.end():]):
            continue  # the article "A" or the pronoun "I"
        if letter in letters:
            return letter
    return None


def multiple_choice_accuracy(pred_texts: Sequence[str], gt_letters: Sequence[str],
                             num_choices: int = 26) -> float:
    """Fraction of answers whose extracted letter equals the true letter, in [0, 1].

    pred_texts: model outputs [N]; gt_letters: true option letters [N]; num_choices: options per
    question (letters beyond it are ignored, which also keeps "I" from being read as an option).
    """
    if len(pred_texts) != len(gt_letters):
        raise ValueError(f"multiple_choice_accuracy: {len(pred_texts)} pred_texts but {len(gt_letters)} gt_letters")
    if not pred_texts:
        raise ValueError("multiple_choice_accuracy: no predictions to score (pred_texts is empty)")
    hits = [extract_choice(p, num_choices) == _gt_letter(g, num_choices) for p, g in zip(pred_texts, gt_letters)]
    return float(np.mean(hits))


def _gt_letter(gt: str, num_choices: int) -> str:
    letter = str(gt).strip().upper()
    if len(letter) != 1 or letter not in _option_letters(num_choices):
        raise ValueError(f"gt_answer {gt!r} is not an option letter among the first {num_choices}")
    return letter


def score_answer(pred_text: str, gt_answer: str | float, answer_type: str, *, num_choices: int = 26,
                 to_metres: bool = False) -> float:
    """Score of one answer in [0, 1].

    answer_type: 'choice' (1 if the extracted letter equals gt_answer, a letter) or 'numeric'
    (MRA against gt_answer, a number or its text, e.g. "2.37"); to_metres: see `extract_number`.
    """
    if answer_type == "choice":
        return float(extract_choice(pred_text, num_choices) == _gt_letter(gt_answer, num_choices))
    if answer_type == "numeric":
        gt = extract_number(gt_answer) if isinstance(gt_answer, str) else gt_answer
        if gt is None:
            raise ValueError(f"score_answer: numeric gt_answer {gt_answer!r} holds no number")
        pred = extract_number(pred_text, to_metres=to_metres) if isinstance(pred_text, str) else pred_text
        return mean_relative_accuracy(pred, gt)
    raise ValueError(f"score_answer: answer_type must be 'choice' or 'numeric', got {answer_type!r}")
