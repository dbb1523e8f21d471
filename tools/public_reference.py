"""Public-format reference: tiny Hugging Face checkpoints + what transformers computes with them.

Run in the OFFICIAL venv (torch CPU + transformers 4.49; never the project venv, tests never import torch):
    /work/official_venv/bin/python tools/public_reference.py --out tests/golden/public

Makes (see tests/golden/public/README.md):
  qwen2vl/        a tiny Qwen2-VL (`Qwen2VLForConditionalGeneration.save_pretrained`, float32, safetensors,
                  SHARDED into several model-0000k-of-0000n.safetensors + model.safetensors.index.json, as the
                  hub ships Qwen2-VL-2B; tie_word_embeddings=True so there is no lm_head.weight), its
                  generation_config.json, a preprocessor_config.json (Qwen2VLImageProcessor with the 2B
                  values) and the tiny 512-token byte-level BPE tokenizer copied from
                  tests/golden/official/tiny_g2vlm.
  dinov2_reg/     a tiny `Dinov2WithRegistersModel.save_pretrained` (float32, single model.safetensors).
  reference.npz   reference outputs of the transformers implementations on those weights:
    dino_images_uint8 [2,56,70,3] uint8, dino_pixels [2,3,56,70] (ImageNet mean/std), dino_last_hidden
        [2,1+4+20,32] (non-native size: HF interpolates the 4x4 position grid to 4x5, bicubic antialias=True);
    dino_images_native_uint8 [2,56,56,3] uint8, dino_pixels_native [2,3,56,56], dino_last_hidden_native
        [2,1+4+16,32] (native grid, no interpolation);
    vit_images_uint8 [2,56,84,3] uint8, vit_pixel_values [48,1176] (Qwen2VLImageProcessor flattened patches,
        CLIP mean/std), vit_grid_thw [2,3] int64, vit_tokens [12,64] (model.visual(pixel_values, grid_thw));
    text_ids [1,12] int64, text_position_ids [3,1,12] int64 (0..11 on all 3 M-RoPE axes),
        text_logits [1,12,512] (model(input_ids).logits, no images).
All float arrays are float32. Every parameter is re-drawn from a seeded torch.Generator after construction
(matrices N(0, 0.05), biases N(0, 0.05), norm weights 1 + N(0, 0.1), DINO position/cls/register/mask tokens
N(0, 0.5), LayerScale lambdas U(0.5, 1.5)). Computation runs single-threaded in float32 with eager
attention; the npz is written with fixed zip timestamps, so two runs give byte-identical folders.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import zipfile

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = "/work/shared/fixtures/pi3_room/rgb"
TOKENIZER_SRC = os.path.join(REPO, "tests", "golden", "official", "tiny_g2vlm")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
SEED = 20250101
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# Special-token ids of the tiny tokenizer (tokenizer_config.json added_tokens_decoder).
ENDOFTEXT, IM_START, IM_END = 498, 499, 500
VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD = 507, 508, 509, 510, 511


def qwen2vl_config() -> Qwen2VLConfig:
    return Qwen2VLConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32768,
        max_window_layers=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        sliding_window=32768,
        use_sliding_window=False,
        tie_word_embeddings=True,
        torch_dtype="float32",
        bos_token_id=ENDOFTEXT,
        eos_token_id=IM_END,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        vision_token_id=VISION_PAD,
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_config=dict(
            depth=2,
            embed_dim=32,
            num_heads=2,
            mlp_ratio=2,
            hidden_size=64,
            hidden_act="quick_gelu",
            in_channels=3,
            in_chans=3,  # the key Qwen2-VL-2B's hub config.json uses (transformers reads in_channels)
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
    )


def dino_config() -> Dinov2WithRegistersConfig:
    return Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=14,
        image_size=56,
        num_register_tokens=4,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        torch_dtype="float32",
    )


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Re-draws every parameter (in named_parameters order) so no tensor keeps a default value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            is_norm = any(t in name for t in ("norm", "ln_q", "layernorm")) and leaf in ("weight", "bias")
            if leaf == "lambda1":  # DINO LayerScale
                new = 0.5 + torch.rand(p.shape, generator=gen)
            elif leaf in ("position_embeddings", "cls_token", "register_tokens", "mask_token"):
                new = 0.5 * torch.randn(p.shape, generator=gen)
            elif is_norm and leaf == "weight":
                new = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            else:  # matrices, conv kernels, embeddings, biases
                new = 0.05 * torch.randn(p.shape, generator=gen)
            p.copy_(new.to(p.dtype))


def load_rgb(index: int, size_wh: tuple[int, int]) -> np.ndarray:
    img = Image.open(os.path.join(FIXTURES, f"{index}.png")).convert("RGB")
    return np.asarray(img.resize(size_wh, Image.BICUBIC), dtype=np.uint8)


def imagenet_pixels(images_uint8: np.ndarray) -> np.ndarray:
    x = images_uint8.astype(np.float32) / np.float32(255.0)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32)


def save_npz_deterministic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez, but with fixed zip timestamps so the file is byte-identical across runs."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def make_qwen2vl(out_dir: str, gen: torch.Generator, ref: dict[str, np.ndarray]) -> None:
    cfg = qwen2vl_config()
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    randomise(model, gen)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "lm_head must be tied to embed_tokens"

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="300KB")
    for f in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(TOKENIZER_SRC, f), os.path.join(out_dir, f))

    # Image processor with the Qwen2-VL-2B preprocessor values (CLIP mean/std, bicubic, 14/2/2).
    processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14,
                                      temporal_patch_size=2, merge_size=2)
    processor.save_pretrained(out_dir)

    # --- ViT: two fixture images resized to 84x56 (w x h) -> 4x6 patches each -> 2x3 merged tokens each.
    vit_images = np.stack([load_rgb(1, (84, 56)), load_rgb(2, (84, 56))])
    feats = processor(images=[Image.fromarray(im) for im in vit_images], return_tensors="pt")
    pixel_values, grid_thw = feats["pixel_values"], feats["image_grid_thw"]
    assert grid_thw.tolist() == [[1, 4, 6], [1, 4, 6]], grid_thw
    with torch.no_grad():
        vit_tokens = model.visual(pixel_values.to(torch.float32), grid_thw=grid_thw)
    ref["vit_images_uint8"] = vit_images
    ref["vit_pixel_values"] = pixel_values.numpy().astype(np.float32)
    ref["vit_grid_thw"] = grid_thw.numpy().astype(np.int64)
    ref["vit_tokens"] = vit_tokens.numpy().astype(np.float32)

    # --- Text: logits of a text-only sequence (ids < 498: no special tokens).
    text_ids = torch.randint(0, ENDOFTEXT, (1, 12), generator=gen, dtype=torch.int64)
    position_ids = torch.arange(12, dtype=torch.int64).view(1, 1, 12).expand(3, 1, 12).contiguous()
    with torch.no_grad():
        logits = model(input_ids=text_ids).logits
        logits_explicit = model(input_ids=text_ids, position_ids=position_ids).logits
        default_pos, _ = model.get_rope_index(text_ids, None, None, None)
    assert torch.equal(default_pos, position_ids), default_pos
    assert torch.equal(logits, logits_explicit)
    ref["text_ids"] = text_ids.numpy()
    ref["text_position_ids"] = position_ids.numpy()
    ref["text_logits"] = logits.numpy().astype(np.float32)


def make_dino(out_dir: str, gen: torch.Generator, ref: dict[str, np.ndarray]) -> None:
    cfg = dino_config()
    cfg._attn_implementation = "eager"
    model = Dinov2WithRegistersModel(cfg).eval()
    randomise(model, gen)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    for suffix, size_wh in (("", (70, 56)), ("_native", (56, 56))):
        images = np.stack([load_rgb(0, size_wh), load_rgb(3, size_wh)])
        pixels = imagenet_pixels(images)
        with torch.no_grad():
            hidden = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        ref[f"dino_images{suffix}_uint8"] = images
        ref[f"dino_pixels{suffix}"] = pixels
        ref[f"dino_last_hidden{suffix}"] = hidden.numpy().astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "golden", "public"))
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(SEED)  # construction-time init (overwritten below, but keeps everything seeded)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)

    ref: dict[str, np.ndarray] = {}
    make_qwen2vl(os.path.join(args.out, "qwen2vl"), torch.Generator().manual_seed(SEED), ref)
    make_dino(os.path.join(args.out, "dinov2_reg"), torch.Generator().manual_seed(SEED + 1), ref)
    ref["meta_transformers_version"] = np.array(transformers.__version__)
    save_npz_deterministic(os.path.join(args.out, "reference.npz"), ref)
    for k in sorted(ref):
        print(f"{k:28s} {str(ref[k].dtype):8s} {tuple(ref[k].shape)}")


if __name__ == "__main__":
    main()
