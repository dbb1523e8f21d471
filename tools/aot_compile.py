"""`python tools/aot_compile.py ...` = `g2vlm aot ...`: see g2vlm_jax/aot.py (the library behind both)."""
import pathlib
import sys

if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from g2vlm_jax import aot

    sys.exit(aot.main())
