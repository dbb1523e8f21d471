"""tfds builders of scene records (importing this package registers them with tfds).

    synthetic_scenes, synthetic_spatial_qa   procedural scenes (configs tiny/small/wide or custom)
    npz_scenes                               generic folders: condition.npz + rgb/{i}.png
    scannet_scenes                           ScanNet export folders (color/depth/pose/intrinsic)
    spar_qa                                  SPAR-style QA rows from jsonl

Read any of them with `open_scenes(name, split=..., data_dir=...)` or directly with
`tfds.data_source(name, split=..., data_dir=...)` + `records.record_to_scene`.
"""
from data_pipelines.builders.synthetic import SyntheticConfig, SyntheticScenes, SyntheticSpatialQa

__all__ = ["SyntheticConfig", "SyntheticScenes", "SyntheticSpatialQa"]
