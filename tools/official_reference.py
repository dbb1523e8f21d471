"""Official-parity reference: a tiny G2VLM checkpoint + what the official PyTorch code computes with it.

Makes tests/golden/official/ (see its README.md):
  tiny_g2vlm/      a tiny G2VLM in the official release layout (model.safetensors float32, text/vit/
                   dino_config.json) with seeded random weights on every tensor, plus a tiny Qwen2-style
                   byte-level BPE tokenizer (tokenizer.json + vocab.json/merges.txt/tokenizer_config.json).
  reference.npz    the official model's recon / chat / Pi3Loss results on the fixture images.

Step 1, PROJECT venv (jax; builds the model with our code, writes it with g2vlm_jax.convert):
    .venv/bin/python tools/official_reference.py checkpoint --out tests/golden/official/tiny_g2vlm
Step 2, OFFICIAL venv (torch CPU + transformers 4.49; never the project venv, tests never import torch):
    /work/official_venv/bin/python tools/official_reference.py run --official-src /work/official_src \
        --ckpt tests/golden/official/tiny_g2vlm --out tests/golden/official/reference.npz
  --official-src is a work tree of InternRobotics/G2VLM (`git archive HEAD -- modeling data g2vlm_utils.py
  ...`). Nothing of it is copied here: it is imported at run time; the CPU patches below are monkeypatches.

CPU patches applied by `run` (nothing else of the official code is changed):
  * fake modules: `flash_attn.flash_attn_varlen_func` -> `varlen_attention` below (exact flash-attn
    varlen semantics: segment i of q attends to segment i of k/v, softmax scale head_dim^-0.5, GQA by
    head groups, causal = bottom-right aligned `k <= q + (Lk - Lq)`; rows outside every segment, which
    flash-attn leaves uninitialised, are 0; each segment runs torch's fused CPU
    `scaled_dot_product_attention`, memory linear like flash-attn: the reference arrays agree with the
    earlier dense einsum stand-in to 2.4e-6 relative); `torchvision` (Normalize / ToTensor with torchvision's
    arithmetic; nothing else is called), `cv2`, `open3d`, `easydict` (import-only).
  * float32 everywhere: the explicit `.to(torch.bfloat16)` casts inside the LLM attention / MoT layers
    (modeling/g2vlm/qwen2vl.py), the DINO attention (modeling/g2vlm/dinov2_model.py) and the ViT
    attention (modeling/qwen2vl/modeling_qwen2_vl.py) become float32 casts (those modules see a `torch`
    whose `bfloat16` is float32). The `torch.amp.autocast("cuda", bf16)` blocks are inert on a CPU-only
    torch (torch disables them with a warning). `.cuda()` is never called (we build the model ourselves).
  * `Qwen2VLAttention.__init__` overwrites `rope_scaling["mrope_section"]` with [16, 24, 24] (the 2B
    values); after construction the config's own sections are put back (needed for head_dim != 128).
  * head sizes: the official G2VLM hard-codes 5-block/16-head decoders with point/camera widths 1024/512;
    the decoder/head constructors are wrapped to take the sizes our converter records under
    text_config.json["g2vlm_heads"] (a tiny checkpoint; same code path).
  * `Qwen2VLImageProcessor.from_pretrained('InternRobotics/G2VLM-2B-MoT')` (network) -> the processor
    built locally with the Qwen2-VL-2B preprocessor values (min_pixels 3136, max_pixels 12845056,
    patch 14, temporal 2, merge 2, CLIP mean/std, bicubic).
  * `prepare_dino_images_pi3` hard-codes `load_and_resize14(images, 518)`; the width is replaced by
    --dino-width (the dino_transform argument of recon/chat is ignored by the official code).
  * flex attention (the training forward only; recon/chat use flash-attn): `create_block_mask` in
    modeling/g2vlm/g2vlm.py -> `dense_block_mask` (the mask_mod evaluated on the whole [Q, KV] grid, a bool
    matrix) and the `torch.compile`d `flex_attention` of modeling/g2vlm/qwen2vl.py -> `dense_flex_attention`
    (scaled_dot_product_attention with that matrix, GQA, scale head_dim^-0.5: what flex_attention computes;
    every row of the packed training masks attends at least to itself, so no row is empty).
  * `Qwen2VLModel.forward_train` tests `idx_l in intermediate_layers` whenever output_hidden_states is on, and
    `G2VLM.forward` (training) turns it on without passing intermediate_layers, so the shipped training
    forward stops with "TypeError: argument of type 'NoneType' is not iterable" on any device; the wrapper
    passes an empty list when none is given (the collected hidden states are never read by G2VLM.forward).
    The same forward then returns `EasyDict(mse=mse, ...)` with `mse` never assigned (NameError): the module
    gets a global `mse = None` (no MSE term in a reconstruction step; the Pi3 loss is the `dl` entry).
  * DINO segments: the official code gives the DINO flash attention cu_seqlens counting h*w tokens per
    image while each image has 1 + registers + h*w tokens (segments straddle images; the last 5V rows
    stay uninitialised). Default `--dino-segments per_image` attends within each image (SPEC 1.3, what
    this project does); the shipped segmentation is recorded separately (keys *_shipped_segments).

Keys of reference.npz (float32 unless noted; int64 ids; strings as 0-d unicode arrays). V = views.
  meta_*                   official_commit (str), dino_width, vit_size (h, w given to QwenVL2ImageTransform),
                           special_ids [im_start, im_end, vision_start, vision_end, endoftext] (int64),
                           image_files / chat_image_files (str, comma-separated names in fixtures/pi3_room/rgb)
  recon_* (model.recon on 3 fixture images; recon_prompt (str)):
    recon_prefill_ids [L0], recon_prefill_positions [3, L0]   text prefill ('<|im_start|>' + prompt ids)
    recon_geo_text_ids [2V] the vision_start/end ids of the geometry chunk, recon_geo_text_indexes [2V],
    recon_geo_token_indexes [V*h*w] (chunk-local indexes), recon_geo_positions [3, V*(h*w+2)]
    recon_images [V, 3, H, W]  resized images in [0,1] (`original_images`)
    recon_pixels [V, 3, H, W]  the ImageNet-normalised tensor the DINO encoder consumed
    recon_dino_tokens [V, h*w, Ddino]   DINO patch tokens (final LayerNorm, before dino2llm)
    recon_last_hidden [L1, D]  final-normed hidden states of the geometry chunk (markers + tokens)
    recon_local_points [1, V, H, W, 3], recon_camera_poses [1, V, 4, 4] (c2w),
    recon_points [1, V, H, W, 3] (= camera_poses @ local_points, world), recon_global_points [1, V, H, W, 3]
    recon_has_conf (bool; False: the official recon returns conf=None)
    recon_dino_tokens_shipped_segments, recon_camera_poses_shipped_segments: the same with the official
                               (straddling) DINO segments
  chat_* (model.chat_with_recon, greedy, on 2 fixture images):
    chat_prompt (str), chat_max_length, chat_stage{0,1}_ids / _positions: text prefills
      (stage0 = system/user prefix, stage1 = question + '<|im_end|>\n<|im_start|>assistant')
    chat_geo_positions [3, .], chat_geo_text_ids, chat_geo_pixels [V, 3, H, W]
    chat_vit{i}_pixels [n_patches, 3*2*14*14] (processor output), chat_vit{i}_grid_thw [3],
      chat_vit{i}_text_ids [2], chat_vit{i}_positions [3, n/4 + 2]
    chat_start_token [1], chat_start_position [3, 1], chat_logits [steps, vocab]: row i = logits after
      feeding chat_generated_ids[i]; chat_generated_ids [steps] (start token first, as generate_text returns;
      argmax(row i) = ids[i + 1]; the last row's argmax is computed but not kept by the official loop),
      chat_text (str, tokenizer.decode(ids[1:]))
  loss_* (Pi3Loss, B=2 samples x N=3 views, H x W = 28 x 35: a centred crop of fixture views
         [0, 2, 4] / [1, 3, 6] taking every 2nd pixel; intrinsics adjusted to the crop):
    loss_world_points [B,N,H,W,3] (depth unprojected with loss_intrinsics, then c2w), loss_point_masks
    [B,N,H,W] bool (sample 0: ~15% random invalid pixels with valid depth; sample 1: a block in view 1),
    loss_extrinsics [B,N,4,4] (c2w), loss_depths [B,N,H,W], loss_intrinsics [B,N,3,3],
    loss_view_infos (str, comma-separated, B*N: sample 0 'scannet/...' (normal loss on), 1 'co3d/...' (off)),
    loss_pred_local_points, loss_pred_global_points [B,N,H,W,3], loss_pred_camera_poses [B,N,4,4]
    loss_{total,local_pts_loss,normal_loss,global_pts_loss,trans_loss,rot_loss,scale[B]}  as shipped
      (GT scale factor cast to bfloat16), and the same with suffix _fp32gt (that cast made float32).
  metric_{case}_* (modeling/g2vlm/metric.py, the VGGSfM/VGGT relative-pose metric, called as its evaluation
         calls it, float32 torch on CPU, batch_size=1). camera_to_rel_deg takes PyTorch3D cameras (pytorch3d
         is not installed: a stand-in object returns the matrices from get_world_to_view_transform().get_matrix()).
         Our OpenCV c2w poses become w2c extrinsics [R|t] = inv(c2w) (float64), then PyTorch3D's row-vector
         world-to-view matrices as pytorch3d's cameras_from_opencv_projection makes them: [[R^T F, 0], [t^T F, 1]],
         F = diag(-1, -1, 1) (x/y axes flipped; no angle changes), cast to float32.
    case recon:      pred = recon_camera_poses[0], GT = condition.npz poses of the recon views (meta_image_files
                     0,2,4.png -> views 0, 2, 4).
    case perturbed8: GT = all 8 condition.npz poses; pred = GT with per-view rotation noise (angle 15 deg * u^2,
                     u ~ U(0,1), random axis) and centre noise (0.2 * u^2 * N(0, I)), then a global similarity
                     (random rotation of 30-150 deg, scale 2.5, translation N(0, I)); rng = default_rng(SEED + 2).
                     Errors span ~2-23 deg with one pair at ~67 deg (outside every AUC range).
    metric_{case}_pred_c2w, metric_{case}_gt_c2w [V,4,4]   the inputs (c2w, OpenCV)
    metric_{case}_pair_i, metric_{case}_pair_j [P] int64    batched_all_pairs(1, V): all i < j in
                     torch.combinations order (0,1), (0,2), ..., (V-2,V-1), P = V(V-1)/2
    metric_{case}_r_error, metric_{case}_t_error [P]        camera_to_rel_deg's per-pair degrees (relative pose
                     inv(M_i) @ M_j, i.e. camera i -> camera j; t error folded to [0, 90] by the squared cosine)
    metric_{case}_auc_np_{5,15,30} (float64)  calculate_auc_np(r, t, max_threshold) (a fraction, not percent;
                     np.histogram with edges 0..tau, tau bins of 1 deg)
    metric_{case}_auc_torch_{5,15,30}         calculate_auc(r, t, max_threshold) (torch.histc with tau + 1 bins
                     over [0, tau], bins of tau/(tau+1) deg, mean over tau + 1 cumulative values)
    metric_{case}_hist_np_30 [30] (float64), metric_{case}_hist_torch_30 [31]   their normalised histograms
"""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path("/work/shared/fixtures/pi3_room")
SEED = 20260501
RECON_PROMPT = "Reconstruct the 3D scene."
SYSTEM_PROMPT = "You are a helpful assistant."
QUESTION = "How far is the chair from the table?"
# Qwen2-VL's special tokens in Qwen2's order (ids base+0 .. base+14 as 151643..151657 in Qwen2).
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


# ==================================================================================================
# checkpoint (project venv)
# ==================================================================================================
def _corpus() -> list[str]:
    chat = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
            "<|im_start|>assistant\nThe chair is 1.5 meters from the table.<|im_end|>\n")
    words = ("chair table sofa bed lamp door window shelf desk cabinet plant picture television monitor keyboard "
             "mirror sink toilet bathtub counter refrigerator oven microwave pillow blanket curtain rug floor wall "
             "ceiling kitchen bedroom bathroom living room office corridor").split()
    relations = ("left of", "right of", "in front of", "behind", "above", "below", "next to", "closer to the camera than")
    lines = [RECON_PROMPT, SYSTEM_PROMPT, QUESTION, "system\n", "user\n", "assistant\n", chat,
             "Please answer the question using a single word or phrase.", "Answer with a number in meters.",
             "0 1 2 3 4 5 6 7 8 9 . , ? ! ; : ( ) - + / % A B C D yes no"]
    for i, a in enumerate(words):  # deterministic spatial-QA style sentences
        b = words[(7 * i + 3) % len(words)]
        rel = relations[i % len(relations)]
        lines += [f"Is the {a} {rel} the {b}?", f"The {a} is {rel} the {b}.",
                  f"How far is the {a} from the {b}? About {i % 5}.{(3 * i) % 10} meters.",
                  f"How many {a}s are in the {words[(5 * i) % len(words)]}? There are {i % 4 + 1}."]
    return lines * 2


def build_tokenizer(out: pathlib.Path, bpe_vocab: int = 512 - 14) -> dict[str, int]:
    """Tiny Qwen2-style byte-level BPE: tokenizer.json + the slow-tokenizer files. Returns special ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    plain = [line.replace("<|im_start|>", "").replace("<|im_end|>", "") for line in _corpus()]
    tok.train_from_iterator(plain, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt (the slow Qwen2Tokenizer's files)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    decoder = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for s, i in ids.items()}
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
              "additional_special_tokens": [s for s in SPECIALS if s != "<|endoftext|>"],
              "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
              "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
              "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": config["additional_special_tokens"], "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>"}, indent=2))
    return ids


def _random_value(name: str, shape: tuple[int, ...], rng):
    import numpy as np

    is_norm = any(k in name for k in ("norm", "ln_q", "layernorm"))
    if name.endswith("mask_token"):
        return np.zeros(shape, np.float32)  # DINO masked-image pretraining only; the converter writes zeros
    if name.endswith((".gamma", ".lambda1")):  # LayerScale (LLM geometry expert ls1/ls2, DINO)
        return rng.uniform(0.3, 1.0, shape).astype(np.float32)
    if is_norm and name.endswith(".weight"):
        return rng.uniform(0.7, 1.3, shape).astype(np.float32)
    if name.endswith(".bias"):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) >= 2 and "embed_tokens" not in name and "embeddings." not in name:
        fan_in = int(np.prod(shape[1:]))
        std = float(np.clip(fan_in ** -0.5, 0.02, 0.1))
    else:
        std = 0.1  # token / position / CLS / register embeddings
    return (std * rng.standard_normal(shape)).astype(np.float32)


def write_random_checkpoint(model_cfg, out: pathlib.Path) -> dict[str, int]:
    """An official-layout checkpoint of `model_cfg` (vocab 512: the tiny tokenizer fills it) with seeded
    random weights on every tensor (`_random_value`), written by g2vlm_jax.convert; returns the special ids."""
    import tempfile

    import numpy as np
    from flax import nnx

    sys.path.insert(0, str(ROOT))
    from g2vlm_jax import convert
    from g2vlm_jax.model.g2vlm import G2VLM

    model = nnx.eval_shape(lambda: G2VLM(model_cfg, rngs=nnx.Rngs(0)))
    template = convert.official_shapes(model_cfg, model)
    rng = np.random.default_rng(SEED)
    state = {name: _random_value(name, tuple(template[name]), rng) for name in sorted(template)}
    model = convert.from_official(state, model_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ids = build_tokenizer(pathlib.Path(tmp))
        # Every model id decodes: the vocabulary fills the embedding table exactly.
        assert max(ids.values()) == model_cfg.text.vocab_size - 1, (ids, model_cfg.text.vocab_size)
        convert.write_official_dir(model, out, dtype="float32", tokenizer_dir=tmp)
    # Round trip: what was written is exactly the random state.
    _, back = convert.read_official_dir(out)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(np.asarray(back[name]), value, err_msg=name)
    return ids


def cmd_checkpoint(args) -> None:
    sys.path.insert(0, str(ROOT))
    from g2vlm_jax import config as C

    out = pathlib.Path(args.out)
    ids = write_random_checkpoint(C.tiny_model(use_vit=True), out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.2f} MiB)")
    print("special ids:", {s: ids[s] for s in SPECIALS})


# ==================================================================================================
# run (official venv)
# ==================================================================================================
def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     dropout_p=0.0, softmax_scale=None, causal=False, **unused):
    """flash_attn_varlen_func semantics in float32 (see the module docstring)."""
    import torch

    assert dropout_p == 0.0
    tq, hq, d = q.shape
    hk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qs = q[cq[i]:cq[i + 1]].float().transpose(0, 1)[None]  # [1, Hq, Lq, D]
        ks = k[ck[i]:ck[i + 1]].float().transpose(0, 1)[None]  # [1, Hk, Lk, D]
        vs = v[ck[i]:ck[i + 1]].float().transpose(0, 1)[None]
        lq, lk = qs.shape[2], ks.shape[2]
        if lq == 0:
            continue
        mask = None
        if causal:
            mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        # torch's fused CPU attention (flash-style, memory-linear without a mask), as flash-attn is on GPU
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                                             enable_gqa=hq != hk)
        out[cq[i]:cq[i + 1]] = o[0].transpose(0, 1).to(q.dtype)
    return out


def dense_block_mask(mask_mod, B=None, H=None, Q_LEN=0, KV_LEN=0, device="cpu", **unused):
    """torch's create_block_mask stand-in: the mask_mod evaluated on every (q, kv) pair -> bool [Q_LEN, KV_LEN]
    (the official mask_mods are elementwise tensor expressions, so broadcast index grids evaluate them)."""
    import torch

    zero = torch.zeros((), dtype=torch.long)
    q_idx, kv_idx = torch.arange(Q_LEN)[:, None], torch.arange(KV_LEN)[None, :]
    return mask_mod(zero, zero, q_idx, kv_idx).expand(Q_LEN, KV_LEN).to(device)


def dense_flex_attention(query, key, value, block_mask=None, enable_gqa=False, scale=None, **unused):
    """flex_attention stand-in on a `dense_block_mask` matrix: q [1, Hq, L, D], k/v [1, Hk, L, D] -> [1, Hq, L, D]."""
    import torch

    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=block_mask,
                                                            enable_gqa=enable_gqa, scale=scale)


class _Anything:
    """A name inside an import-only module (below): the official code imports it at module level but the
    reference path never calls it; any attribute is another such name, calling one is an error."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, item):
        return _Anything(f"{self._name}.{item}")

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self._name} was only imported (torchvision/cv2/open3d are not installed in the "
                           "reference venv); the reference path must not call it")

    def __mro_entries__(self, bases):
        return (object,)


class _ImportOnlyModule(types.ModuleType):
    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Anything(f"{self.__name__}.{item}")


def install_import_only_modules() -> None:
    import numpy as np
    import torch

    fa = types.ModuleType("flash_attn")
    fa.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    fa.flash_attn_varlen_func = varlen_attention
    sys.modules["flash_attn"] = fa

    class Normalize:  # torchvision.transforms.Normalize: tensor.sub_(mean).div_(std) per channel
        def __init__(self, mean, std, inplace=False):
            self.mean, self.std = mean, std

        def __call__(self, t):
            mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
            return (t - mean) / std

    class ToTensor:  # PIL uint8 HWC -> float CHW / 255
        def __call__(self, pic):
            arr = np.array(pic, np.uint8, copy=True)
            if arr.ndim == 2:
                arr = arr[:, :, None]
            return torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div(255)

    tv = _ImportOnlyModule("torchvision")
    tr = _ImportOnlyModule("torchvision.transforms")
    tr.Normalize, tr.ToTensor = Normalize, ToTensor
    tv.transforms = tr
    for name, mod in {"torchvision": tv, "torchvision.transforms": tr,
                      "torchvision.transforms.functional": _ImportOnlyModule("torchvision.transforms.functional"),
                      "torchvision.utils": _ImportOnlyModule("torchvision.utils"),
                      "cv2": _ImportOnlyModule("cv2"), "open3d": _ImportOnlyModule("open3d")}.items():
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers probes find_spec
        sys.modules[name] = mod

    ed = types.ModuleType("easydict")
    ed.__spec__ = importlib.machinery.ModuleSpec("easydict", None)

    class EasyDict(dict):
        def __getattr__(self, k):
            return self[k]

    ed.EasyDict = EasyDict
    sys.modules["easydict"] = ed


def _f32_torch():
    """A `torch` namespace whose bfloat16 is float32 (given to modules with explicit bf16 casts)."""
    import torch

    class TorchF32(types.ModuleType):
        bfloat16 = torch.float32

        def __getattr__(self, item):
            return getattr(torch, item)

    return TorchF32("torch")


def float32_loss(built):
    """The official `pi3.models.pi3_loss` module with its GT-scale bfloat16 cast made float32 (the `_fp32gt`
    variant of the loss_ keys; our float32 training computes that scale in float32). Call after
    build_official_model (its sys.path). Returns the module."""
    import pi3.models.pi3_loss as loss_mod

    loss_mod.torch = built.f32
    return loss_mod


def build_official_model(official_src, ckpt, *, dino_width: int, dino_segments: str = "per_image"):
    """The official G2VLM built from `ckpt` exactly as g2vlm_utils.load_model_and_tokenizer builds it, with the
    CPU patches of the module docstring applied (official venv). Returns a namespace: model (float32, eval),
    tokenizer, new_token_ids, dino_transform, f32 (the bf16->fp32 torch namespace) and `settings`, the
    mutable patch settings {'dino_segments': 'per_image' | 'shipped', 'dino_width': int}."""
    import torch

    src = pathlib.Path(official_src).resolve()
    ckpt = pathlib.Path(ckpt).resolve()
    sys.path[:0] = [str(src), str(src / "modeling")]
    install_import_only_modules()

    import g2vlm_utils  # noqa: F401  (imports everything the official loader imports)
    import modeling.g2vlm.dinov2_model as dino_mod
    import modeling.g2vlm.g2vlm as g2_mod
    import modeling.g2vlm.qwen2vl as qwen_mod
    import modeling.qwen2vl.modeling_qwen2_vl as hfq_mod
    from data.data_utils import add_special_tokens
    from data.transforms_vggt import DinoImageNormalizeTransform
    from modeling.g2vlm import (G2VLM, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, G2VLMConfig,
                                Qwen2VLConfig)
    from modeling.g2vlm.qwen2vl import Qwen2VLForCausalLM
    from modeling.qwen2 import Qwen2Tokenizer
    from modeling.qwen2vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from modeling.qwen2vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from modeling.qwen2vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    from safetensors.torch import load_file

    # ---- float32 patches ----
    f32 = _f32_torch()
    for mod in (qwen_mod, dino_mod, hfq_mod):
        mod.torch = f32
    qwen_mod.flash_attn_varlen_func = varlen_attention
    hfq_mod.flash_attn_varlen_func = varlen_attention
    settings = {"dino_segments": dino_segments, "dino_width": dino_width}

    def dino_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        if settings["dino_segments"] == "per_image":
            n = len(cu_seqlens_q) - 1
            per = q.shape[0] // n
            cu_seqlens_q = cu_seqlens_k = torch.arange(n + 1, dtype=torch.int32) * per
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal)

    dino_mod.flash_attn_varlen_func = dino_varlen
    g2_mod.create_block_mask = dense_block_mask  # the training forward's flex attention (module docstring)
    qwen_mod.flex_attention = dense_flex_attention
    forward_train = qwen_mod.Qwen2VLModel.forward_train
    qwen_mod.Qwen2VLModel.forward_train = lambda self, *a, intermediate_layers=None, **k: forward_train(
        self, *a, intermediate_layers=[] if intermediate_layers is None else intermediate_layers, **k)
    g2_mod.mse = None  # G2VLM.forward's return reads an unassigned `mse` (module docstring)

    # ---- heads sized from text_config.json["g2vlm_heads"] ----
    text_json = json.loads((ckpt / "text_config.json").read_text())
    heads = text_json.get("g2vlm_heads", {})
    depth, n_heads = heads.get("decoder_layers", 5), heads.get("decoder_heads", 16)
    mlp_ratio = heads.get("mlp_ratio", 4)
    point_dim, camera_dim = heads.get("point_dim", 1024), heads.get("camera_dim", 512)
    widths = {1024: point_dim, 512: camera_dim}
    Dec, CtxDec = g2_mod.Pi3TransformerDecoder, g2_mod.Pi3ContextTransformerDecoder
    Lin, Cam = g2_mod.Pi3LinearPts3d, g2_mod.Pi3CameraHead
    g2_mod.Pi3TransformerDecoder = lambda **kw: Dec(**{**kw, "depth": depth, "dec_num_heads": n_heads,
                                                       "mlp_ratio": mlp_ratio, "out_dim": widths[kw["out_dim"]]})
    g2_mod.Pi3ContextTransformerDecoder = lambda **kw: CtxDec(**{**kw, "depth": depth, "dec_num_heads": n_heads,
                                                                 "mlp_ratio": mlp_ratio,
                                                                 "out_dim": widths[kw["out_dim"]]})
    g2_mod.Pi3LinearPts3d = lambda patch_size, dec_embed_dim, output_dim=3: Lin(
        patch_size=patch_size, dec_embed_dim=widths[dec_embed_dim], output_dim=output_dim)
    g2_mod.Pi3CameraHead = lambda dim=512: Cam(dim=widths[dim])

    # ---- no network: the Qwen2-VL processor with the 2B preprocessor values ----
    Qwen2VLImageProcessor.from_pretrained = classmethod(lambda cls, *a, **k: cls(
        min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2))

    # ---- DINO width: the official inference hard-codes 518 ----
    orig_resize14 = g2_mod.load_and_resize14
    g2_mod.load_and_resize14 = lambda images, new_width: orig_resize14(images, settings["dino_width"])

    # ---- build exactly as g2vlm_utils.load_model_and_tokenizer (tiny configs from the folder) ----
    llm_config = Qwen2VLConfig.from_json_file(str(ckpt / "text_config.json"))
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2VLMoTDecoderLayer"
    vit_config = Qwen2VLVisionConfig.from_json_file(str(ckpt / "vit_config.json"))
    vit_config.patch_size = 14
    dino_config = Dinov2WithRegistersConfig.from_json_file(str(ckpt / "dino_config.json"))
    config = G2VLMConfig(visual_und=True, visual_recon=True, llm_config=llm_config, vit_config=vit_config,
                         dino_config=dino_config, vit_max_num_patch_per_side=36)
    mrope_section = list(llm_config.rope_scaling["mrope_section"])
    language_model = Qwen2VLForCausalLM(llm_config)
    llm_config.rope_scaling["mrope_section"] = mrope_section  # undo Qwen2VLAttention's [16, 24, 24]
    for layer in language_model.model.layers:
        assert layer.self_attn.rope_scaling["mrope_section"] == mrope_section
    vit_model = Qwen2VisionTransformerPretrainedModel(vit_config)
    dino_model = Dinov2WithRegistersModel(dino_config)
    model = G2VLM(language_model, vit_model, dino_model, config)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(ckpt))
    n_before = len(tokenizer)
    tokenizer, new_token_ids, num_new = add_special_tokens(tokenizer)
    assert num_new == 0 and len(tokenizer) == n_before, (num_new, len(tokenizer), n_before)
    dino_transform = DinoImageNormalizeTransform(target_size=518)

    state = load_file(str(ckpt / "model.safetensors"), device="cpu")
    msg = model.load_state_dict(state, strict=False)
    own = set(model.state_dict())
    # The official loader uses strict=False; the training loss' segformer is absent with train_conf off.
    if msg.missing_keys or msg.unexpected_keys:
        print("missing:", msg.missing_keys, "\nunexpected:", msg.unexpected_keys)
        raise SystemExit("checkpoint does not match the official model")
    assert own == set(state), sorted(own ^ set(state))
    model = model.float().eval()
    return types.SimpleNamespace(model=model, tokenizer=tokenizer, new_token_ids=new_token_ids,
                                 dino_transform=dino_transform, settings=settings, f32=f32)


def cmd_run(args) -> None:
    import subprocess

    import numpy as np
    import torch
    from PIL import Image

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # deterministic reductions
    built = build_official_model(args.official_src, args.ckpt, dino_width=args.dino_width,
                                 dino_segments=args.dino_segments)
    model, tokenizer, new_token_ids = built.model, built.tokenizer, built.new_token_ids
    dino_transform, dino_segments, f32 = built.dino_transform, built.settings, built.f32
    import pi3.models.pi3_loss as loss_mod
    from data.data_utils import pil_img2rgb
    from data.transforms import QwenVL2ImageTransform
    language_model, vit_model = model.language_model, model.vit_model
    print("vit attention class:", type(vit_model.blocks[0].attn).__name__,
          "| llm attention class:", type(language_model.model.layers[0].self_attn).__name__)

    rec: dict[str, np.ndarray] = {}

    def npy(t):
        return t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)

    commit = subprocess.run(["git", "-C", args.mirror, "rev-parse", "HEAD"], capture_output=True, text=True)
    rec["meta_official_commit"] = np.array(commit.stdout.strip() or "unknown")
    rec["meta_dino_width"] = np.array(args.dino_width)
    rec["meta_vit_size"] = np.array(args.vit_size)
    rec["meta_special_ids"] = np.array([new_token_ids["bos_token_id"], new_token_ids["eos_token_id"],
                                        new_token_ids["start_of_image"], new_token_ids["end_of_image"],
                                        tokenizer.convert_tokens_to_ids("<|endoftext|>")], np.int64)

    # Slow (official) and fast (tokenizer.json, what our code reads) tokenizers must agree.
    from tokenizers import Tokenizer as Fast
    fast = Fast.from_file(str(pathlib.Path(args.ckpt) / "tokenizer.json"))
    for text in (RECON_PROMPT, f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n",
                 QUESTION + "<|im_end|>\n<|im_start|>assistant", "<|im_start|>user\\your text<|im_end|>\n"):
        slow_ids = tokenizer.encode(text)
        fast_ids = fast.encode(text, add_special_tokens=False).ids
        assert slow_ids == fast_ids, (text, slow_ids, fast_ids)

    # ---- capture hooks ----
    log: dict[str, list] = {"text": [], "dino": [], "vit": [], "start": [], "generated": [], "logits": []}

    def wrap(name, key, record_out=False):
        fn = getattr(model, name)

        def wrapped(*a, **k):
            out = fn(*a, **k)
            log[key].append((k, out) if record_out else k)
            return out

        setattr(model, name, wrapped)

    wrap("forward_cache_update_text", "text")
    wrap("forward_cache_update_vit", "vit")
    wrap("forward_cache_update_dino", "dino", record_out=True)
    def record_output(name, key):
        original = getattr(model, name)

        def recorded(*a, **k):
            out = original(*a, **k)
            log[key].append(out)
            return out

        setattr(model, name, recorded)

    record_output("prepare_start_tokens", "start")
    record_output("generate_text", "generated")
    model.language_model.lm_head.register_forward_hook(lambda m, i, o: log["logits"].append(o.detach().clone()))
    dino_out: list = []
    model.dino_model.register_forward_hook(lambda m, i, o: dino_out.append(o.detach().clone()))

    # ---- recon ----
    files = [str(FIXTURES / "rgb" / f"{i}.png") for i in (0, 2, 4)]
    rec["meta_image_files"] = np.array(",".join(pathlib.Path(f).name for f in files))
    rec["recon_prompt"] = np.array(RECON_PROMPT)

    def run_recon():
        for v in log.values():
            v.clear()
        dino_out.clear()
        with torch.no_grad():
            return model.recon(tokenizer, new_token_ids, dino_transform, list(files))

    pred = run_recon()
    (text_in,) = log["text"]
    rec["recon_prefill_ids"] = npy(text_in["packed_text_ids"])
    rec["recon_prefill_positions"] = npy(text_in["packed_text_position_ids"])
    ((dino_in, (_, last_hidden)),) = log["dino"]
    rec["recon_geo_text_ids"] = npy(dino_in["packed_text_ids"])
    rec["recon_geo_text_indexes"] = npy(dino_in["packed_text_indexes"])
    rec["recon_geo_token_indexes"] = npy(dino_in["packed_dino_token_indexes"])
    rec["recon_geo_positions"] = npy(dino_in["packed_position_ids"])
    rec["recon_images"] = npy(dino_in["original_images"])
    rec["recon_pixels"] = npy(dino_in["packed_dino_images"])
    rec["recon_dino_tokens"] = npy(dino_out[0])
    rec["recon_last_hidden"] = npy(last_hidden)
    for key in ("local_points", "camera_poses", "points", "global_points"):
        rec[f"recon_{key}"] = npy(pred[key]).astype(np.float32)
    rec["recon_has_conf"] = np.array(pred["conf"] is not None)

    dino_segments["dino_segments"] = "shipped"
    pred_shipped = run_recon()
    dino_segments["dino_segments"] = args.dino_segments
    rec["recon_dino_tokens_shipped_segments"] = npy(dino_out[0])
    rec["recon_camera_poses_shipped_segments"] = npy(pred_shipped["camera_poses"])

    # ---- chat ----
    for v in log.values():
        v.clear()
    vit_h, vit_w = args.vit_size
    image_transform = QwenVL2ImageTransform(vit_h, vit_w, 14)
    chat_files = [str(FIXTURES / "rgb" / f"{i}.png") for i in (1, 5)]
    images = [pil_img2rgb(Image.open(f).convert("RGB")) for f in chat_files]
    rec["meta_chat_image_files"] = np.array(",".join(pathlib.Path(f).name for f in chat_files))
    with torch.no_grad():
        answer = model.chat_with_recon(tokenizer, new_token_ids, image_transform, dino_transform, images=images,
                                       prompt=QUESTION, max_length=args.max_length, do_sample=False)
    rec["chat_prompt"] = np.array(QUESTION)
    rec["chat_max_length"] = np.array(args.max_length)
    assert len(log["text"]) == 2, len(log["text"])
    for i, k in enumerate(log["text"]):
        rec[f"chat_stage{i}_ids"] = npy(k["packed_text_ids"])
        rec[f"chat_stage{i}_positions"] = npy(k["packed_text_position_ids"])
    ((dino_in, _),) = log["dino"]
    rec["chat_geo_text_ids"] = npy(dino_in["packed_text_ids"])
    rec["chat_geo_positions"] = npy(dino_in["packed_position_ids"])
    rec["chat_geo_pixels"] = npy(dino_in["packed_dino_images"])
    for i, k in enumerate(log["vit"]):
        rec[f"chat_vit{i}_pixels"] = npy(k["packed_vit_images"])[0]
        rec[f"chat_vit{i}_grid_thw"] = npy(k["packed_image_grid_thw"])[0]
        rec[f"chat_vit{i}_text_ids"] = npy(k["packed_text_ids"])
        rec[f"chat_vit{i}_positions"] = npy(k["packed_position_ids"])
    (start,) = log["start"]
    rec["chat_start_token"] = npy(start["packed_start_tokens"])
    rec["chat_start_position"] = npy(start["packed_query_position_ids"])
    rec["chat_logits"] = np.concatenate([npy(x) for x in log["logits"]], axis=0)
    rec["chat_generated_ids"] = npy(log["generated"][0])[:, 0]
    rec["chat_text"] = np.array(answer)

    # ---- loss ----
    rec.update(loss_reference(loss_mod, f32, args.loss_size))

    # ---- pose metrics ----
    import modeling.g2vlm.metric as metric_mod
    gt_poses = np.load(FIXTURES / "condition.npz", allow_pickle=False)["poses"].astype(np.float32)
    recon_views = [int(pathlib.Path(n).stem) for n in str(rec["meta_image_files"]).split(",")]
    rec.update(metrics_reference(metric_mod, "recon", rec["recon_camera_poses"][0], gt_poses[recon_views]))
    rec.update(metrics_reference(metric_mod, "perturbed8", perturbed_poses(gt_poses), gt_poses))

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **rec)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")
    for k, v in rec.items():
        print(f"  {k:42s} {str(v.dtype):8s} {tuple(v.shape)}" + (f"  {v}" if v.size <= 40 else ""))


def _resize_nearest(a, h, w):
    import numpy as np

    rows = np.floor((np.arange(h) + 0.5) * a.shape[0] / h).astype(int)
    cols = np.floor((np.arange(w) + 0.5) * a.shape[1] / w).astype(int)
    return a[rows][:, cols]


def _smooth_noise(rng, shape, h, w, amp):
    """Low-frequency noise: a 3x4 random grid upsampled bilinearly to h x w."""
    import numpy as np
    import torch

    coarse = torch.from_numpy(rng.standard_normal((shape, 3, 4)).astype(np.float32))[None]
    fine = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0]
    return amp * fine.numpy()


def _rot(rng, angle):
    import numpy as np

    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def loss_reference(loss_mod, f32, size, stride=2) -> dict:
    """Pi3Loss on B=2 x N=3 views of the fixture scene (inputs + every term), bf16-GT as shipped and fp32."""
    import numpy as np
    import torch

    h, w = size
    cond = np.load(FIXTURES / "condition.npz", allow_pickle=False)
    rng = np.random.default_rng(SEED + 1)
    views = [[0, 2, 4], [1, 3, 6]]
    B, N = len(views), 3
    depths = np.zeros((B, N, h, w), np.float32)
    intr = np.zeros((B, N, 3, 3), np.float32)
    poses = np.zeros((B, N, 4, 4), np.float32)
    world = np.zeros((B, N, h, w, 3), np.float32)
    local_gt = np.zeros((B, N, h, w, 3), np.float32)
    H0, W0 = cond["depths"].shape[1:]
    # A centred crop sampled every `stride` pixels (pixel u' = (u - x0) / stride): coarse enough to be small,
    # fine enough that depth_edge (rtol 0.03) leaves part of each view to the normal loss.
    y0, x0 = (H0 - h * stride) // 2, (W0 - w * stride) // 2
    for b, vs in enumerate(views):
        for n, v in enumerate(vs):
            z = cond["depths"][v, y0:y0 + h * stride:stride, x0:x0 + w * stride:stride]
            K = cond["intrinsics"][v].astype(np.float64).copy()
            K[0, 2] -= x0
            K[1, 2] -= y0
            K[:2] /= stride
            u, vv = np.meshgrid(np.arange(w), np.arange(h))
            x = (u - K[0, 2]) / K[0, 0] * z
            y = (vv - K[1, 2]) / K[1, 1] * z
            cam = np.stack([x, y, z], -1)
            P = cond["poses"][v].astype(np.float64)
            depths[b, n], intr[b, n], poses[b, n] = z, K, P
            local_gt[b, n] = cam
            world[b, n] = cam @ P[:3, :3].T + P[:3, 3]
    masks = depths > 0
    masks[0] &= rng.random((N, h, w)) > 0.15  # ~15% invalid pixels with finite positive depth
    masks[1, 1, h // 4: h // 4 + h // 3, w // 3: w // 3 + w // 3] = False  # a block of invalid pixels
    view_infos = [f"scannet/scene0000_00/{v}" for v in views[0]] + [f"co3d/chair/{v}" for v in views[1]]

    # Predictions: a scaled, smoothly perturbed copy of the GT (local z stays positive) and perturbed poses.
    pred_local = np.zeros_like(local_gt)
    pred_global = np.zeros_like(world)
    pred_poses = np.zeros_like(poses)
    for b in range(B):
        s = 0.6 + 0.2 * b
        for n in range(N):
            noise = _smooth_noise(rng, 3, h, w, 0.05).transpose(1, 2, 0)
            loc = s * local_gt[b, n] * (1 + noise)
            pred_local[b, n] = loc
            R = _rot(rng, 0.05) @ poses[b, n, :3, :3]
            t = s * poses[b, n, :3, 3] + 0.05 * rng.standard_normal(3)
            pred_poses[b, n] = np.block([[R, t[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]])
            pred_global[b, n] = loc @ R.T + t  # predicted world points, moved to predicted frame 0 below
        inv0 = np.linalg.inv(pred_poses[b, 0])
        pred_global[b] = pred_global[b] @ inv0[:3, :3].T + inv0[:3, 3]
        pred_global[b] += _smooth_noise(rng, 3 * N, h, w, 0.03).reshape(N, 3, h, w).transpose(0, 2, 3, 1)

    rec = {"loss_world_points": world, "loss_point_masks": masks, "loss_extrinsics": poses, "loss_depths": depths,
           "loss_intrinsics": intr, "loss_view_infos": np.array(",".join(view_infos)),
           "loss_pred_local_points": pred_local.astype(np.float32),
           "loss_pred_global_points": pred_global.astype(np.float32),
           "loss_pred_camera_poses": pred_poses.astype(np.float32)}
    real_torch = loss_mod.torch
    for suffix, torch_ns in (("", real_torch), ("_fp32gt", f32)):
        loss_mod.torch = torch_ns
        scales = []
        point_forward = loss_mod.PointLoss.forward

        def capture(self, pred, gt, _f=point_forward):
            out = _f(self, pred, gt)
            scales.append(out[2].detach().clone())
            return out

        loss_mod.PointLoss.forward = capture
        try:
            fn = loss_mod.Pi3Loss(train_conf=False)
            # Copies: Pi3Loss.normalize_pred divides pred["global_points"] in place.
            pred = {"local_points": torch.tensor(rec["loss_pred_local_points"]),
                    "global_points": torch.tensor(rec["loss_pred_global_points"]),
                    "camera_poses": torch.tensor(rec["loss_pred_camera_poses"]), "conf": None}
            batch = {"world_points": torch.tensor(world), "point_masks": torch.tensor(masks),
                     "extrinsics": torch.tensor(poses), "images": torch.zeros(B, N, 3, h, w),
                     "view_infos": list(view_infos)}
            with torch.no_grad():
                total, details = fn(pred, batch)
        finally:
            loss_mod.PointLoss.forward = point_forward
            loss_mod.torch = real_torch
        rec[f"loss_total{suffix}"] = np.asarray(float(total), np.float32)
        for k, v in details.items():
            rec[f"loss_{k}{suffix}"] = np.asarray(float(v), np.float32)
        rec[f"loss_scale{suffix}"] = scales[0].numpy().astype(np.float32)
    return rec


class _P3DCameras:
    """Stand-in for a pytorch3d cameras batch: only what metric.camera_to_rel_deg calls."""

    def __init__(self, world_to_view):
        self._m = world_to_view

    def get_world_to_view_transform(self):
        return self

    def get_matrix(self):
        return self._m


def _p3d_cameras(c2w):
    """OpenCV c2w [V,4,4] -> PyTorch3D world-to-view matrices (row vectors), as cameras_from_opencv_projection."""
    import numpy as np
    import torch

    c2w = np.asarray(c2w, np.float64)
    flip = np.diag([-1.0, -1.0, 1.0])
    r_w2c = np.swapaxes(c2w[:, :3, :3], 1, 2)
    t_w2c = -np.einsum("vij,vj->vi", r_w2c, c2w[:, :3, 3])
    m = np.zeros_like(c2w)
    m[:, :3, :3] = np.swapaxes(r_w2c, 1, 2) @ flip  # pytorch3d R = R_w2c^T, columns 0/1 negated
    m[:, 3, :3] = t_w2c @ flip                      # pytorch3d T = t_w2c, entries 0/1 negated
    m[:, 3, 3] = 1.0
    return _P3DCameras(torch.tensor(m, dtype=torch.float32))


def perturbed_poses(gt_c2w):
    """GT c2w [V,4,4] -> seeded noisy copy in another similarity frame (float32); see the metric_ keys."""
    import numpy as np

    rng = np.random.default_rng(SEED + 2)
    gt = np.asarray(gt_c2w, np.float64)
    pred = gt.copy()
    for v in range(len(gt)):
        pred[v, :3, :3] = _rot(rng, np.deg2rad(15.0 * rng.uniform() ** 2)) @ gt[v, :3, :3]
        pred[v, :3, 3] = gt[v, :3, 3] + 0.2 * rng.uniform() ** 2 * rng.standard_normal(3)
    rot = _rot(rng, np.deg2rad(rng.uniform(30.0, 150.0)))
    scale, shift = 2.5, rng.standard_normal(3)
    pred[:, :3, :3] = rot @ pred[:, :3, :3]
    pred[:, :3, 3] = scale * pred[:, :3, 3] @ rot.T + shift
    return pred.astype(np.float32)


def metrics_reference(metric_mod, case, pred_c2w, gt_c2w) -> dict:
    """The official relative-pose errors and AUCs of pred vs GT c2w poses (metric_{case}_* keys)."""
    import numpy as np

    pred_c2w, gt_c2w = np.asarray(pred_c2w, np.float32), np.asarray(gt_c2w, np.float32)
    r_err, t_err = metric_mod.camera_to_rel_deg(_p3d_cameras(pred_c2w), _p3d_cameras(gt_c2w), "cpu", 1)
    pair_i, pair_j = metric_mod.batched_all_pairs(1, len(gt_c2w))  # the pairs camera_to_rel_deg takes
    rec = {"pred_c2w": pred_c2w, "gt_c2w": gt_c2w, "pair_i": pair_i.numpy().astype(np.int64),
           "pair_j": pair_j.numpy().astype(np.int64), "r_error": r_err.numpy(), "t_error": t_err.numpy()}
    for tau in (5, 15, 30):
        auc_np, hist_np = metric_mod.calculate_auc_np(r_err.numpy(), t_err.numpy(), max_threshold=tau)
        auc_t, hist_t = metric_mod.calculate_auc(r_err, t_err, max_threshold=tau, return_list=True)
        rec[f"auc_np_{tau}"] = np.asarray(auc_np, np.float64)
        rec[f"auc_torch_{tau}"] = auc_t.numpy()
        if tau == 30:
            rec["hist_np_30"], rec["hist_torch_30"] = np.asarray(hist_np, np.float64), hist_t.numpy()
    return {f"metric_{case}_{k}": v for k, v in rec.items()}


def main() -> None:
    global FIXTURES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("checkpoint", help="tiny checkpoint + tokenizer (project venv)")
    p.add_argument("--out", default="tests/golden/official/tiny_g2vlm")
    p = sub.add_parser("run", help="official reference outputs (official torch venv)")
    p.add_argument("--official-src", required=True)
    p.add_argument("--ckpt", default="tests/golden/official/tiny_g2vlm")
    p.add_argument("--out", default="tests/golden/official/reference.npz")
    p.add_argument("--mirror", default="/work/.mirror/InternRobotics+G2VLM/repo", help="git dir for the commit id")
    p.add_argument("--dino-width", type=int, default=70, help="replaces the official hard-coded 518 (multiple of 14)")
    p.add_argument("--vit-size", type=int, nargs=2, default=(112, 84),
                   help="QwenVL2ImageTransform(h, w): PIL resize((h, w)) i.e. width=h, height=w (official: 768 768)")
    p.add_argument("--fixtures", default=str(FIXTURES), help="pi3_room fixture (rgb/*.png, condition.npz)")
    p.add_argument("--max-length", type=int, default=6)
    p.add_argument("--loss-size", type=int, nargs=2, default=(28, 35),
                   help="H W of the loss sample (a centred crop of the fixture, every 2nd pixel)")
    p.add_argument("--dino-segments", choices=("per_image", "shipped"), default="per_image")
    args = parser.parse_args()
    if args.cmd == "run":
        FIXTURES = pathlib.Path(args.fixtures)
    {"checkpoint": cmd_checkpoint, "run": cmd_run}[args.cmd](args)


if __name__ == "__main__":
    main()
