"""Shared test set-up.

- Grain worker processes read absl flags; mark them parsed so tests that start workers do not fail.
- Tests run on one CPU device unless a test re-launches itself with fake devices (see
  tests/multidevice.py); XLA_FLAGS must be set before jax is imported, so this file never imports jax
  at module level for anything that would fix the device count.
"""
import os
import pathlib
import sys

from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
