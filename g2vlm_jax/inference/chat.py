"""`g2vlm chat`: one question about images, answered with the geometry frames in context (SPEC 4).

Semantic images (`--images`) go to the ViT at the experiment's `data.vit_image_size`; geometry
frames (`--frames FOLDER`, default: the same images) go to DINO at the experiment's frame width
(`data.image_size[1]`, sides floored to multiples of 14), so the model sees the scene's geometry
features while it answers, as in training (stage-2 layout).
"""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from g2vlm_jax import config as config_lib
from g2vlm_jax.inference import generate as gen
from g2vlm_jax.inference import reconstruct


def semantic_image(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """One image -> float32[H, W, 3] in [0, 1] at `size` (H, W), bicubic (the training resize)."""
    return np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC), np.float32) / 255.0


def load_semantic_images(paths: list[str], size: tuple[int, int]) -> np.ndarray:
    """Image files -> float32[N, H, W, 3] in [0, 1] at `size` (H, W), bicubic (the training resize)."""
    out = []
    for p in paths:
        try:
            img = Image.open(p)
            img.load()
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise ValueError(f"image {p} cannot be read ({e}); pass existing PNG/JPEG files to --images") from e
        out.append(semantic_image(img, size))
    return np.stack(out) if out else np.zeros((0, size[0], size[1], 3), np.float32)


def _check_semantic_expert(cfg: config_lib.ExperimentConfig, has_images: bool) -> None:
    if has_images and not cfg.model.use_vit:
        raise ValueError(
            f"this checkpoint ({cfg.name}) was trained for reconstruction only (model.use_vit=false): it has no "
            "semantic image encoder and its language expert never learnt to answer. Train a spatial-QA stage from it "
            "(`g2vlm export` it, then e.g. `g2vlm train --experiment experiments/tiny_synthetic.py:qa --set "
            "checkpoint.init_from=EXPORT`) and chat with that checkpoint, or run `g2vlm reconstruct` on these images")


def answer_arrays(model, tok, cfg: config_lib.ExperimentConfig, *, question: str, semantic: np.ndarray,
                  frames: np.ndarray, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0) -> str:
    """The answer text for images already at the model's sizes: semantic float32[N, H, W, 3] in [0, 1] at
    `data.vit_image_size`, geometry frames float32[V, h, w, 3] in [0, 1] (`reconstruct.frame_size`)."""
    _check_semantic_expert(cfg, len(semantic) > 0)
    result = gen.generate(model, tok, [gen.Prompt(question, frames, semantic)], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed, preset=cfg.mesh.preset)
    return result.texts[0]


def answer(model, tok, cfg: config_lib.ExperimentConfig, *, question: str, images: list[str], frames: str = "",
           max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
    """The model's answer text (up to <|im_end|>)."""
    _check_semantic_expert(cfg, bool(images))
    sem = load_semantic_images(images, tuple(cfg.data.vit_image_size))
    if frames:
        frame_files = reconstruct.list_images(frames)
    else:
        frame_files = [pathlib.Path(p) for p in images]
    geo = (reconstruct.load_images(frame_files, cfg.data.image_size[1]).astype(np.float32) / 255.0
           if frame_files else np.zeros((0, 14, 14, 3), np.float32))
    return answer_arrays(model, tok, cfg, question=question, semantic=sem, frames=geo, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, seed=seed)
