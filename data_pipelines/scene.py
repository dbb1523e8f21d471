"""The in-memory multi-view scene: what a decoded record is, before view sampling.

Records on disk (`records.py`) decode into a `Scene`; samplers (`sampling.py`) cut views out of it;
synthetic generators and real-data converters produce it. Conventions (SPEC): OpenCV cameras,
camera-to-world poses, metric depth as camera z with 0 meaning "no value", pixel-index intrinsics.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class QAPair:
    """One spatial question about a scene, with an exact answer."""

    question: str  # text shown to the model (option list included for multiple choice)
    answer: str  # ground-truth answer text (an option letter for 'choice', a number for 'numeric')
    answer_type: str  # 'numeric' | 'choice'
    task: str  # task family, e.g. 'distance', 'depth', 'closer', 'count', 'direction', 'camera_motion'
    choices: tuple[str, ...] = ()  # option texts for 'choice' ("A. ...", ...)
    views: tuple[int, ...] = ()  # scene views the question is about (sampled first, in this order)
    markers: tuple[tuple[int, float, float, str], ...] = ()  # (view, u, v, label) points drawn on semantic images


@dataclasses.dataclass(frozen=True)
class Scene:
    """A decoded multi-view RGB-D scene.

    images:     uint8[V, H, W, 3]
    depth:      float32[V, H, W]   metres (camera z); 0 = no value
    intrinsics: float32[V, 3, 3]   pixel units, u = fx * x / z + cx
    c2w:        float32[V, 4, 4]   camera-to-world, OpenCV axes
    """

    scene_id: str
    dataset: str
    images: np.ndarray
    depth: np.ndarray
    intrinsics: np.ndarray
    c2w: np.ndarray
    z_far: float = 0.0  # depth beyond this is invalid (0 = no far plane)
    normal_loss: bool = True  # dataset quality flag gating the normal loss (SPEC 2.1 step 6)
    qa: tuple[QAPair, ...] = ()

    @property
    def num_views(self) -> int:
        return int(self.images.shape[0])

    def check(self) -> None:
        """Raises ValueError naming the scene and the broken field (shapes and dtypes only)."""
        v = self.num_views
        h, w = self.images.shape[1:3] if self.images.ndim == 4 else (-1, -1)
        expect = {"images": ((v, h, w, 3), np.uint8), "depth": ((v, h, w), np.float32),
                  "intrinsics": ((v, 3, 3), np.float32), "c2w": ((v, 4, 4), np.float32)}
        for name, (shape, dtype) in expect.items():
            arr = getattr(self, name)
            if tuple(arr.shape) != shape or arr.dtype != dtype:
                raise ValueError(f"scene {self.scene_id!r} ({self.dataset}): {name} is {arr.dtype}{list(arr.shape)}, "
                                 f"expected {np.dtype(dtype).name}{list(shape)}")
