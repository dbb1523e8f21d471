"""`ModelPredictor`: the benchmark's Predictor (base.py) backed by a loaded G2VLM checkpoint.

Frames are sized by the one rule of `g2vlm reconstruct` (`reconstruct.frame_size`: `width` wide, a
multiple of 14, the first image's aspect ratio) and resized with Lanczos; reconstruction is one
forward pass (`reconstruct.predict`), answers are greedy (`chat.answer_arrays`). The width defaults
to the checkpoint's experiment frame width (`cfg.data.image_size[1]`); the official model was trained
at 518.
"""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

from g2vlm_jax.inference import chat, reconstruct


def check_width(width: int | None) -> None:
    if width is not None and width < 14:
        raise ValueError(f"--width {width}: the frame width must be at least 14 pixels (one patch); omit it for "
                         "the checkpoint's experiment width")


class ModelPredictor:
    """reconstruct / input_size / answer of base.Predictor for (cfg, model, tokenizer)."""

    def __init__(self, cfg, model, tok, *, width: int | None = None, checkpoint: str = ""):
        check_width(width)
        self.cfg, self.model, self.tok = cfg, model, tok
        self.width = int(width or cfg.data.image_size[1])
        self.checkpoint = checkpoint

    @classmethod
    def load(cls, checkpoint: str | pathlib.Path, *, width: int | None = None, overrides=(), devices=None):
        """Loads `checkpoint` (a run directory or a params-only checkpoint, as `g2vlm reconstruct` takes)."""
        from g2vlm_jax.inference import load
        from g2vlm_jax.tokenizer import load_tokenizer

        check_width(width)  # before the model is loaded
        cfg, model = load.load_model(checkpoint, overrides, devices=devices)
        return cls(cfg, model, load_tokenizer(cfg.data.tokenizer), width=width, checkpoint=str(checkpoint))

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return reconstruct.frame_size(height, width, self.width)

    def frames(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 images [H, W, 3] (any sizes) -> uint8[V, h, w, 3] at the first image's input size."""
        if not images:
            raise ValueError("ModelPredictor: no images given")
        size = self.input_size(*images[0].shape[:2])
        return np.stack([reconstruct.resize_frame(Image.fromarray(np.asarray(a, np.uint8)), size) for a in images])

    def reconstruct(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        return reconstruct.predict(self.model, self.tok, self.frames(images), preset=self.cfg.mesh.preset)

    def answer(self, question: str, images: list[np.ndarray], max_new_tokens: int = 32) -> str:
        """Greedy answer; `images` go to the ViT (semantic) and, as geometry frames, to DINO (chat's layout)."""
        size = tuple(self.cfg.data.vit_image_size)
        semantic = (np.stack([chat.semantic_image(Image.fromarray(np.asarray(a, np.uint8)), size) for a in images])
                    if images else np.zeros((0, *size, 3), np.float32))
        frames = (self.frames(images).astype(np.float32) / 255.0 if images
                  else np.zeros((0, 14, 14, 3), np.float32))
        return chat.answer_arrays(self.model, self.tok, self.cfg, question=question, semantic=semantic, frames=frames,
                                  max_new_tokens=max_new_tokens)
