"""Depth metrics: alignments, hand-computed values, the depth cap, bad input, aggregation, real depths."""
import pathlib

import numpy as np
import pytest
from scipy import optimize

from g2vlm_jax.metrics import depth


def _fixture_depths() -> np.ndarray:
    here = pathlib.Path(__file__).resolve()
    for base in (here.parents[1].parent, here.parents[3]):  # shared/ beside the checkout, or above wt/
        path = base / "shared" / "fixtures" / "pi3_room" / "condition.npz"
        if path.exists():
            return np.load(path)["depths"].astype(np.float64)
    pytest.fail("shared/fixtures/pi3_room not found next to the checkout")


def _scene_depth(seed=0, shape=(24, 32)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.5, 8.0, shape)


@pytest.mark.parametrize("align", ["median", "l1_scale", "scale_shift"])
def test_scaled_prediction_is_perfect_after_alignment(align):
    gt = _scene_depth()
    m = depth.depth_metrics(0.37 * gt, gt, None, align=align)
    assert m["abs_rel"] < 1e-9 and m["rmse"] < 1e-8 and m["log_rmse"] < 1e-8
    assert m["delta_1.25"] == 1.0 and m["num_valid"] == gt.size


def test_scale_shift_recovers_affine_prediction():
    gt = _scene_depth(1)
    m = depth.depth_metrics((gt - 0.4) / 3.0, gt, None, align="scale_shift")
    assert m["abs_rel"] < 1e-9
    # the scale-only alignments cannot undo a shift
    assert depth.depth_metrics((gt - 0.4) / 3.0, gt, None, align="median")["abs_rel"] > 0.01


def test_hand_computed_values_without_alignment():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])  # the 0 is "no value"
    pred = np.array([[1.5, 2.0], [2.0, 9.0]])
    m = depth.depth_metrics(pred, gt, None, align="none")
    assert m["num_valid"] == 3
    np.testing.assert_allclose(m["abs_rel"], (0.5 + 0 + 0.5) / 3)
    np.testing.assert_allclose(m["sq_rel"], (0.25 / 1 + 0 + 4 / 4) / 3)
    np.testing.assert_allclose(m["rmse"], np.sqrt((0.25 + 0 + 4) / 3))
    np.testing.assert_allclose(m["log_rmse"], np.sqrt((np.log(1.5) ** 2 + 0 + np.log(2) ** 2) / 3))
    # ratios 1.5, 1, 2: one below 1.25, two below 1.5625, still two below 1.953
    assert (m["delta_1.25"], m["delta_1.25^2"], m["delta_1.25^3"]) == (1 / 3, 2 / 3, 2 / 3)


def test_median_alignment_value():
    gt = np.array([[1.0, 2.0, 3.0]])
    pred = np.array([[1.0, 1.0, 2.0]])  # s = median(gt)/median(pred) = 2 -> [2, 2, 4]
    m = depth.depth_metrics(pred, gt, None, align="median")
    np.testing.assert_allclose(m["abs_rel"], (1.0 + 0.0 + 1 / 3) / 3)


def test_l1_scale_is_the_l1_optimum_and_resists_outliers():
    rng = np.random.default_rng(3)
    gt = _scene_depth(2)
    pred = 0.5 * gt * rng.normal(1.0, 0.02, gt.shape)
    pred.ravel()[:60] *= 5.0  # 8% gross outliers
    p, g = pred.ravel(), gt.ravel()
    s, b = depth.align_depth(p, g, "l1_scale")
    best = optimize.minimize_scalar(lambda x: np.abs(x * p - g).sum(), bounds=(0.1, 10), method="bounded",
                                    options={"xatol": 1e-10})
    assert b == 0.0
    # the protocol's 10 IRLS steps get within 1% of the exact L1 optimum; least squares is far off
    np.testing.assert_allclose(s, best.x, rtol=1e-2)
    s_lsq = p @ g / (p @ p)
    assert abs(s_lsq - best.x) > 10 * abs(s - best.x)
    l1 = depth.depth_metrics(pred, gt, None, align="l1_scale")["abs_rel"]
    lsq = depth.depth_metrics(pred, gt, None, align="scale_shift")["abs_rel"]
    assert l1 < lsq


def test_max_depth_masks_far_gt_and_clips_predictions():
    gt = np.array([[10.0, 60.0, 80.0]])
    pred = np.array([[10.0, 100.0, 80.0]])
    m = depth.depth_metrics(pred, gt, None, align="none", max_depth=70)
    assert m["num_valid"] == 2  # gt 80 > 70 is not scored
    np.testing.assert_allclose(m["abs_rel"], (0 + 10 / 60) / 2)  # 100 clipped to 70
    # without the cap, the far pixel counts and the prediction is not clipped
    m = depth.depth_metrics(pred, gt, None, align="none")
    np.testing.assert_allclose(m["abs_rel"], (0 + 40 / 60 + 0) / 3)


def test_non_positive_predictions_count_as_wrong_not_as_nan():
    gt = np.array([[1.0, 2.0, 3.0, 4.0]])
    pred = np.array([[1.0, 2.0, -3.0, 0.0]])
    m = depth.depth_metrics(pred, gt, None, align="none")
    assert np.isfinite(m["log_rmse"]) and m["delta_1.25"] == 0.5 and m["delta_1.25^3"] == 0.5


def test_mask_and_non_finite_gt_are_excluded():
    gt = _scene_depth(4)
    pred = gt.copy()
    gt[0, 0], gt[0, 1] = np.nan, np.inf
    mask = np.ones(gt.shape, bool)
    mask[5] = False
    pred[5] = 100.0  # wrong, but masked out
    m = depth.depth_metrics(pred, gt, mask, align="none")
    assert m["num_valid"] == gt.size - 2 - gt.shape[1]
    assert m["abs_rel"] == 0.0


def test_empty_mask_gives_nan_and_aggregation_skips_it():
    gt = _scene_depth(5)
    empty = depth.depth_metrics(gt, gt, np.zeros(gt.shape, bool))
    assert empty["num_valid"] == 0 and all(np.isnan(empty[k]) for k in depth.METRIC_KEYS)
    a = depth.depth_metrics(1.1 * gt[:10], gt[:10], None, align="none")   # abs_rel 0.1 on 320 px
    b = depth.depth_metrics(gt[:5], gt[:5], None, align="none")           # abs_rel 0 on 160 px
    agg = depth.aggregate_depth_metrics([a, empty, b])
    assert agg["num_valid"] == 480
    np.testing.assert_allclose(agg["abs_rel"], 0.1 * 320 / 480)
    none = depth.aggregate_depth_metrics([empty])
    assert none["num_valid"] == 0 and np.isnan(none["abs_rel"])


def test_bad_input_raises_with_the_argument_named():
    gt = _scene_depth(6)
    pred = gt.copy()
    pred[3, 3] = np.nan
    with pytest.raises(ValueError, match="pred has 1 non-finite"):
        depth.depth_metrics(pred, gt)
    with pytest.raises(ValueError, match="pred shape"):
        depth.depth_metrics(gt[:, :5], gt)
    with pytest.raises(ValueError, match="mask shape"):
        depth.depth_metrics(gt, gt, np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="gt must be a depth map"):
        depth.depth_metrics(gt[None], gt[None])
    with pytest.raises(ValueError, match="align must be one of"):
        depth.depth_metrics(gt, gt, align="mean")
    with pytest.raises(ValueError, match="max_depth"):
        depth.depth_metrics(gt, gt, max_depth=0)


def test_real_fixture_depths():
    depths = _fixture_depths()[:, ::2, ::2]
    rng = np.random.default_rng(7)
    perfect, noisy = [], []
    for gt in depths:
        perfect.append(depth.depth_metrics(3.0 * gt, gt, gt > 0, align="l1_scale"))
        noisy.append(depth.depth_metrics(gt * rng.normal(1.0, 0.03, gt.shape), gt, None, align="median"))
    agg = depth.aggregate_depth_metrics(perfect)
    assert agg["num_valid"] == int((depths > 0).sum())
    assert agg["abs_rel"] < 1e-9 and agg["delta_1.25"] == 1.0
    agg = depth.aggregate_depth_metrics(noisy)
    assert 0.021 < agg["abs_rel"] < 0.027  # E|N(0, 0.03)| ≈ 0.0239
    assert agg["delta_1.25"] == 1.0  # a ratio of 1.25 is more than 6 sigma away


def test_lad_scale_shift_steps_as_the_released_adam():
    """Adam's first bias-corrected step moves each parameter by lr against its gradient's sign (0 for a
    zero gradient). GT = 2p + 1 with p spread evenly: s starts at median(g)/median(p) = 2 + 1/median(p),
    the residuals p/median(p) - 1 are positive on the upper half, so the scale gradient is positive and
    the shift gradient (the sign count) is 0."""
    p = np.linspace(1.0, 2.0, 10)
    g = 2 * p + 1
    s0 = np.median(g) / np.median(p)
    s, b = depth._lad_scale_shift(p, g, max_steps=1)
    assert s == pytest.approx(s0 - 1e-4, abs=1e-12) and b == 0.0
    s, b = depth.align_depth(p, g, "lad_scale_shift")  # 1000 steps: each parameter moves <= 1000 * lr
    assert abs(b) <= 0.1 + 1e-9 and abs(s - s0) <= 0.1 + 1e-9
    # an exact scale starts at the optimum; Adam's normalised steps react to rounding-level residuals, so it
    # wanders by about lr around it (the release does the same)
    m = depth.depth_metrics(g[None] / 3.0, g[None], None, align="lad_scale_shift")
    assert m["abs_rel"] < 1e-5 and m["delta_1.25"] == 1.0
