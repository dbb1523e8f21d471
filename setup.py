"""Install g2vlm_jax: `pip install -e ".[test]"`.

The JAX family is pinned exactly: flax NNX, orbax and grain change APIs between minor releases,
and a run that resumes a checkpoint must see the same library behaviour that wrote it.
"""
from setuptools import find_packages, setup

JAX_FAMILY = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
]

REQUIRED = JAX_FAMILY + [
    "numpy>=2.4,<2.5",
    "sentencepiece==0.2.3",    # tokenizer of the tiny configs (trained by tools/train_tokenizer.py)
    "tokenizers>=0.21",        # Qwen2 byte-level BPE vocabulary of the official checkpoint
    "absl-py>=2.1",            # flags and logging, as grain/orbax expect them
    "safetensors>=0.4",        # official checkpoint and params-only export (no pickle anywhere)
    "scipy>=1.13",             # KD-trees for point-map metrics, IRLS/median helpers
    "pillow>=10.0",            # PNG/JPEG decode and Lanczos resizing
    "tensorboardX>=2.6",       # TensorBoard scalars without TensorFlow
    "tqdm>=4.66",              # progress bars for converters and tools
    "trimesh>=4.0",            # .ply and .glb export of point clouds (with camera frusta)
    "matplotlib>=3.8",         # evaluation pictures (depth maps, trajectories, tables)
    "av>=14.0",                # PyAV: decodes VSI-Bench's mp4 videos for `g2vlm benchmark` (no other decoder here)
    "pyarrow>=15.0",           # reads the parquet question files of VSI-Bench / SPAR-Bench (also a tfds dependency)
]

setup(
    name="g2vlm_jax",
    version="0.1.0",
    description="G2VLM (geometry-grounded VLM) in JAX/Flax NNX: train, evaluate, serve, export.",
    packages=find_packages(include=["g2vlm_jax*", "data_pipelines*", "experiments*", "tools*"]),
    # the built-in sentencepiece tokenizer; the native CPU attention kernel's source (compiled on first use)
    package_data={"g2vlm_jax": ["assets/*.model", "model/kernels/*.cc"]},
    python_requires=">=3.11",
    install_requires=REQUIRED,
    extras_require={
        # pytest-timeout: a stuck test fails the run within its limit, named (see pytest.ini).
        # pycolmap: COLMAP's own reader checks the sparse model `reconstruct` writes (an independent reader).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "pytest-timeout>=2.3", "hypothesis>=6.100", "pycolmap>=3.10"],
        # libtpu alone lets `g2vlm aot` compile for any TPU slice on a CPU-only machine;
        # pinned to the build tested with jax 0.10.2 (compiled memory figures change with it).
        "tpu-aot": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
    },
    entry_points={"console_scripts": ["g2vlm=g2vlm_jax.cli:main"]},
)
