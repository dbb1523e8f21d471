"""tfds builders of scene and VQA records (importing this package registers them with tfds).

    synthetic_scenes, synthetic_spatial_qa   procedural scenes (configs tiny / small / wide, or custom)
    npz_scenes                               generic folders: condition.npz + rgb/{i}.png
    scannet_scenes                           ScanNet SensorData export folders
    spar_qa                                  SPAR-style QA rows from jsonl
    vqa_samples                              general VQA rows (images + conversation) from jsonl

Read scene records with `open_scenes("<builder>/<config>", split=..., data_dir=...)` (or
`tfds.data_source(...)` and `records.record_to_scene`), VQA records with `open_vqa`. Converters for
the manual-data builders live in `data_pipelines.convert`.
"""
from data_pipelines.builders.base import SceneSource, VqaSource, open_scenes, open_vqa
from data_pipelines.builders.npz_scenes import NpzScenes, NpzScenesConfig
from data_pipelines.builders.scannet import ScannetConfig, ScannetScenes
from data_pipelines.builders.spar import SparQa, SparQaConfig
from data_pipelines.builders.synthetic import SyntheticConfig, SyntheticScenes, SyntheticSpatialQa
from data_pipelines.builders.vqa import VqaConfig, VqaSamples

__all__ = ["NpzScenes", "NpzScenesConfig", "ScannetConfig", "ScannetScenes", "SceneSource", "SparQa",
           "SparQaConfig", "SyntheticConfig", "SyntheticScenes", "SyntheticSpatialQa", "VqaConfig", "VqaSamples",
           "VqaSource", "open_scenes", "open_vqa"]
