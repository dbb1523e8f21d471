"""tfds builders of procedural scenes: `synthetic_scenes` (reconstruction) and `synthetic_spatial_qa`.

Both render scene (split, index) with `data_pipelines.synthetic` for index in range(count of the
split); record i of a split is scene i. Predefined configs (H x W, views, train/validation/test):

    tiny   56 x 56,   6 views,  256 / 32 / 32     (the CPU experiments)
    small  224 x 224, 8 views,  4096 / 256 / 256  (stage-1a resolution)
    wide   392 x 518, 12 views, 4096 / 256 / 256  (518 wide, stage-1b style)

Any other size: pass `config=SyntheticConfig(name=..., ...)` to the builder (or in
`builder_kwargs` of `tfds.data_source`).
"""
from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from data_pipelines import records
from data_pipelines.builders.base import SPLITS, SceneRecordBuilder
from g2vlm_jax.console import progress
from data_pipelines.synthetic.render import RenderConfig, render_scene
from data_pipelines.synthetic.spatial_qa import QAConfig, synthetic_qa_scene


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """Scene size and count per split; `render` and `qa` are the generator settings."""

    height: int = 224
    width: int = 224
    num_views: int = 8
    num_scenes: tuple[int, int, int] = (4096, 256, 256)  # train, validation, test
    min_objects: int = 3
    max_objects: int = 7
    seed: int = 0
    qa: QAConfig = QAConfig()  # used by synthetic_spatial_qa only

    @property
    def render(self) -> RenderConfig:
        return RenderConfig(height=self.height, width=self.width, num_views=self.num_views,
                            min_objects=self.min_objects, max_objects=self.max_objects, seed=self.seed)


_CONFIGS = [
    SyntheticConfig(name="tiny", description="56x56, 6 views", height=56, width=56, num_views=6,
                    num_scenes=(256, 32, 32)),
    SyntheticConfig(name="small", description="224x224, 8 views", height=224, width=224, num_views=8),
    SyntheticConfig(name="wide", description="392x518, 12 views", height=392, width=518, num_views=12),
]


class _SyntheticBase(SceneRecordBuilder, skip_registration=True):
    CONFIG_CLASS = SyntheticConfig
    BUILDER_CONFIGS = _CONFIGS

    def _split_generators(self, dl_manager):
        cfg = self.settings
        if len(cfg.num_scenes) != len(SPLITS) or min(cfg.num_scenes) < 0:
            raise ValueError(f"SyntheticConfig.num_scenes={cfg.num_scenes}: give one count >= 0 per split {SPLITS}")
        return {split: self._generate_examples(split, n) for split, n in zip(SPLITS, cfg.num_scenes) if n > 0}

    def _generate_examples(self, split: str, count: int):
        for index in progress(range(count), desc=f"{self.name}/{self.settings.name} {split}", leave=False):
            yield f"{index:08d}", records.scene_to_record(self._scene(split, index))


class SyntheticScenes(_SyntheticBase):
    """Procedurally rendered rooms with exact depth, poses and intrinsics (no QA)."""

    def _scene(self, split: str, index: int):
        return render_scene(split, index, self.settings.render).scene


class SyntheticSpatialQa(_SyntheticBase):
    """The scenes of synthetic_scenes with spatial questions whose answers are exact.

    A new version whenever the generator asks other questions under the same config, so that data prepared
    before is rebuilt instead of read back (tfds keeps each version in its own folder)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "count asks about the one or two views that show every object it counts (was: all "
                              "views, of which a two-view sample could miss some)."}

    def _scene(self, split: str, index: int):
        cfg = self.settings
        return synthetic_qa_scene(split, index, cfg.render, cfg.qa).scene
