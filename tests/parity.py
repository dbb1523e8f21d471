"""What the reference-parity tests share (tests/test_official_parity.py, tests/test_public_init.py)."""
import numpy as np

TOLERANCE = 1e-4  # relative to the largest reference magnitude, float32 (issues #17 and #20)


def relative_error(got, want) -> float:
    """max |got - want| / max |want|, in float64; the shapes must agree."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())
