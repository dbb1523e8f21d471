"""The on-disk record of a multi-view scene (tfds features, ArrayRecord files) and its codec.

One record = one `Scene` (scene.py). Builders (`builders/`) write records with `scene_to_record`;
readers get them back with `tfds.data_source(name, split=..., data_dir=...)[i]` (random access, no
TensorFlow) and decode them with `record_to_scene`.

Feature spec (`scene_features()`), V views of H x W pixels:

    scene_id      Text
    dataset       Text                 dataset name (gates per-dataset behaviour, e.g. the normal loss)
    height, width int32                view size; every view has it
    images        Sequence(bytes)      V encoded images, PNG (lossless) or JPEG, RGB
    depth         Sequence(bytes)      V encoded depth maps, codec in `depth_codec`:
                                         'f32_zlib': zlib of little-endian float32[H, W] metres (exact)
                                         'png16':    uint16 PNG; metres = float32(value) * depth_scale
    depth_codec   Text                 'f32_zlib' | 'png16'
    depth_scale   float32              metres per png16 unit (1.0 for f32_zlib)
    intrinsics    float32[V, 3, 3]     pixel units, u = fx * x / z + cx (pixel centres at integers)
    c2w           float32[V, 4, 4]     camera-to-world, OpenCV axes
    z_far         float32              depth beyond this is invalid (0 = no far plane)
    normal_loss   bool                 dataset quality flag for the normal loss
    qa            Sequence({question, answer, answer_type, task: Text,
                            choices, views, markers: Text holding JSON lists})

General VQA records (`vqa_features()`, builder `vqa_samples`) hold no geometry: sample_id, dataset,
images (1..N encoded bytes, sizes may differ), roles / texts (the conversation, `VQASample.turns`),
answer_type ('' | 'numeric' | 'choice') and choices (JSON list); `record_to_vqa` decodes them.

Why bytes instead of `tfds.features.Image`: the Image feature decodes every view inside
`data_source[i]`, so a corrupt frame raises deep in tfds and a scene with hundreds of frames is
fully decoded even when the sampler keeps four. Raw bytes let `record_to_scene(views=...)` decode
only the chosen views and name what is broken. Nested lists inside the QA sequence are JSON text
because ragged nested sequences need TensorFlow to serialise.

Depth validity is implied: 0 means "no value" (SPEC). Records whose content is broken raise
`BadRecordError(reason, record_id)` with a short stable `reason` (see `REASONS`) so a pipeline can
count skips per reason.
"""
from __future__ import annotations

import dataclasses
import io
import json
import zlib
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines.scene import QAPair, Scene

DEPTH_CODECS = ("f32_zlib", "png16")
IMAGE_FORMATS = ("png", "jpeg")
REASONS = (
    "missing_field",        # a required feature is absent from the record
    "view_count_mismatch",  # images / depth / intrinsics / c2w disagree on the number of views
    "view_size_mismatch",   # a decoded image or depth map is not height x width
    "corrupt_image",        # image bytes do not decode
    "corrupt_depth",        # depth bytes do not decode
    "nonfinite_depth",      # NaN or inf in a depth map (strict only; else set to 0)
    "negative_depth",       # depth < 0 (strict only; else set to 0)
    "empty_depth",          # a view without a single valid depth pixel (strict only)
    "bad_intrinsics",       # non-finite, non-positive focal length, or last row != [0, 0, 1]
    "nonfinite_pose",       # NaN or inf in a camera-to-world matrix
    "singular_pose",        # rotation block not invertible / not a rotation, or last row != [0, 0, 0, 1]
    "bad_qa",               # a QA pair refers to a view that does not exist, or is malformed
)
_REQUIRED = ("scene_id", "dataset", "height", "width", "images", "depth", "depth_codec", "depth_scale",
             "intrinsics", "c2w", "z_far", "normal_loss")


class BadRecordError(Exception):
    """A record whose content cannot become a valid Scene; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, record_id: str, detail: str = ""):
        assert reason in REASONS, reason
        self.reason, self.record_id, self.detail = reason, record_id, detail
        super().__init__(f"record {record_id!r}: {reason}" + (f" ({detail})" if detail else ""))


# --------------------------------------------------------------------------------------------------
# Feature specs
# --------------------------------------------------------------------------------------------------
def _bytes_sequence() -> tfds.features.Sequence:
    return tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))


def scene_features() -> tfds.features.FeaturesDict:
    """The tfds features of a scene record (see the module docstring)."""
    text = tfds.features.Text
    return tfds.features.FeaturesDict({
        "scene_id": text(), "dataset": text(),
        "height": tfds.features.Scalar(dtype=np.int32), "width": tfds.features.Scalar(dtype=np.int32),
        "images": _bytes_sequence(), "depth": _bytes_sequence(),
        "depth_codec": text(), "depth_scale": tfds.features.Scalar(dtype=np.float32),
        "intrinsics": tfds.features.Tensor(shape=(None, 3, 3), dtype=np.float32),
        "c2w": tfds.features.Tensor(shape=(None, 4, 4), dtype=np.float32),
        "z_far": tfds.features.Scalar(dtype=np.float32),
        "normal_loss": tfds.features.Scalar(dtype=np.bool_),
        "qa": tfds.features.Sequence({k: text() for k in (
            "question", "answer", "answer_type", "task", "choices", "views", "markers")}),
    })


# --------------------------------------------------------------------------------------------------
# Image and depth codecs
# --------------------------------------------------------------------------------------------------
def encode_image(image: np.ndarray, fmt: str = "png", jpeg_quality: int = 95) -> bytes:
    """image: uint8[H, W, 3] -> PNG or JPEG bytes."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format {fmt!r} is not one of {IMAGE_FORMATS}")
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # speed over size; lossless either way
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> uint8[H, W, 3] (grey or RGBA sources are converted to RGB). Raises OSError/ValueError."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB") if im.mode != "RGB" else im, dtype=np.uint8)


def encode_depth(depth: np.ndarray, codec: str = "f32_zlib", scale: float = 1.0) -> bytes:
    """depth: float32[H, W] metres -> bytes. 'png16' must be exact: depth == float32(k) * float32(scale)."""
    if codec == "f32_zlib":
        return zlib.compress(np.ascontiguousarray(depth, dtype="<f4").tobytes(), 6)
    if codec != "png16":
        raise ValueError(f"depth codec {codec!r} is not one of {DEPTH_CODECS}")
    steps = np.round(depth.astype(np.float64) / scale)
    if not np.all(np.isfinite(depth)) or steps.min(initial=0) < 0 or steps.max(initial=0) > 65535:
        raise ValueError(f"depth is not representable as png16 with scale {scale} (needs finite 0..{65535 * scale} m)")
    units = steps.astype(np.uint16)
    if not np.array_equal(units.astype(np.float32) * np.float32(scale), depth):
        raise ValueError(f"depth is not an exact multiple of png16 scale {scale}; use depth_codec='f32_zlib'")
    buf = io.BytesIO()
    Image.fromarray(units).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_depth(data: bytes, codec: str, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """bytes -> float32[H, W] metres. Raises ValueError('size') on a shape mismatch, other errors on corruption."""
    if codec == "f32_zlib":
        flat = np.frombuffer(zlib.decompress(data), dtype="<f4")
        if flat.size != shape[0] * shape[1]:
            raise ValueError("size")
        return flat.reshape(shape).astype(np.float32)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        units = np.asarray(im)
    if units.shape != shape:
        raise ValueError("size")
    return units.astype(np.float32) * np.float32(scale)


# --------------------------------------------------------------------------------------------------
# Scene <-> record
# --------------------------------------------------------------------------------------------------
def _qa_to_record(qa: QAPair) -> dict:
    return {"question": qa.question, "answer": qa.answer, "answer_type": qa.answer_type, "task": qa.task,
            "choices": json.dumps(list(qa.choices)), "views": json.dumps(list(qa.views)),
            "markers": json.dumps([list(m) for m in qa.markers])}


def scene_to_record(scene: Scene, *, image_format: str = "png", depth_codec: str = "f32_zlib",
                    depth_scale: float = 1.0, jpeg_quality: int = 95) -> dict:
    """Encodes a Scene into a dict matching `scene_features()`; raises ValueError on a malformed scene."""
    scene.check()
    if scene.num_views == 0:
        raise ValueError(f"scene {scene.scene_id!r} ({scene.dataset}) has no views")
    scale = 1.0 if depth_codec == "f32_zlib" else float(depth_scale)
    return {
        "scene_id": scene.scene_id, "dataset": scene.dataset,
        "height": scene.images.shape[1], "width": scene.images.shape[2],
        "images": [encode_image(im, image_format, jpeg_quality) for im in scene.images],
        "depth": [encode_depth(d, depth_codec, scale) for d in scene.depth],
        "depth_codec": depth_codec, "depth_scale": np.float32(scale),
        "intrinsics": scene.intrinsics, "c2w": scene.c2w,
        "z_far": np.float32(scene.z_far), "normal_loss": bool(scene.normal_loss),
        "qa": [_qa_to_record(q) for q in scene.qa],
    }


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_cameras(intrinsics: np.ndarray, c2w: np.ndarray, rid: str) -> None:
    """intrinsics: float32[V, 3, 3], c2w: float32[V, 4, 4]; raises BadRecordError."""
    k = intrinsics
    if not np.all(np.isfinite(k)) or np.any(k[:, 0, 0] <= 0) or np.any(k[:, 1, 1] <= 0) \
            or not np.allclose(k[:, 2], [0, 0, 1]):
        raise BadRecordError("bad_intrinsics", rid, "need finite fx, fy > 0 and last row [0, 0, 1]")
    if not np.all(np.isfinite(c2w)):
        raise BadRecordError("nonfinite_pose", rid)
    rot = c2w[:, :3, :3].astype(np.float64)
    det = np.linalg.det(rot)
    gram_err = np.abs(np.swapaxes(rot, 1, 2) @ rot - np.eye(3)).max(axis=(1, 2))
    bad = (np.abs(det) < 1e-6) | (gram_err > 1e-3) | np.any(np.abs(c2w[:, 3] - [0, 0, 0, 1]) > 1e-6, axis=1)
    if np.any(bad):
        raise BadRecordError("singular_pose", rid, f"views {np.flatnonzero(bad).tolist()} are not rigid transforms")


def _decode_view(record: dict, v: int, shape: tuple[int, int], rid: str, strict: bool):
    """Decodes view v -> (uint8[H, W, 3], float32[H, W]); raises BadRecordError."""
    try:
        image = decode_image(record["images"][v])
    except (OSError, ValueError, SyntaxError) as e:
        raise BadRecordError("corrupt_image", rid, f"view {v}: {e}") from None
    if image.shape[:2] != shape:
        raise BadRecordError("view_size_mismatch", rid, f"view {v} image is {image.shape[:2]}, expected {shape}")
    codec = _text(record["depth_codec"])
    if codec not in DEPTH_CODECS:
        raise BadRecordError("corrupt_depth", rid, f"unknown depth codec {codec!r}")
    try:
        depth = decode_depth(record["depth"][v], codec, float(record["depth_scale"]), shape)
    except ValueError as e:
        if str(e) == "size":
            raise BadRecordError("view_size_mismatch", rid, f"view {v} depth is not {shape}") from None
        raise BadRecordError("corrupt_depth", rid, f"view {v}: {e}") from None
    except (OSError, zlib.error, SyntaxError) as e:
        raise BadRecordError("corrupt_depth", rid, f"view {v}: {e}") from None
    return image, _clean_depth(depth, v, rid, strict)


def _clean_depth(depth: np.ndarray, v: int, rid: str, strict: bool) -> np.ndarray:
    """Strict: NaN/inf/negative/empty depth raise. Non-strict: such pixels become 0 (no value)."""
    finite = np.isfinite(depth)
    if strict and not finite.all():
        raise BadRecordError("nonfinite_depth", rid, f"view {v}")
    if strict and np.any(depth[finite] < 0):
        raise BadRecordError("negative_depth", rid, f"view {v}")
    if strict and not np.any(depth > 0):
        raise BadRecordError("empty_depth", rid, f"view {v}")
    if not strict:
        depth = np.where(finite & (depth > 0), depth, np.float32(0)).astype(np.float32)
    return depth


def _decode_qa(record: dict, selected: list[int], num_views: int, rid: str) -> tuple[QAPair, ...]:
    """QA pairs whose views are all selected, with views and markers renumbered to the selection."""
    qa = record.get("qa") or {}
    if isinstance(qa, list):  # as `scene_to_record` wrote it; tfds returns a dict of lists
        qa = {k: [q[k] for q in qa] for k in qa[0]}
    questions = qa.get("question", [])
    remap = {old: new for new, old in enumerate(selected)}
    out = []
    for i in range(len(questions)):
        try:
            views = tuple(int(x) for x in json.loads(_text(qa["views"][i])))
            markers = tuple((int(m[0]), float(m[1]), float(m[2]), str(m[3]))
                            for m in json.loads(_text(qa["markers"][i])))
            choices = tuple(str(c) for c in json.loads(_text(qa["choices"][i])))
            answer_type = _text(qa["answer_type"][i])
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise BadRecordError("bad_qa", rid, f"qa {i}: {e}") from None
        used = set(views) | {m[0] for m in markers}
        if any(not 0 <= x < num_views for x in used) or answer_type not in ("numeric", "choice"):
            raise BadRecordError("bad_qa", rid, f"qa {i}: views {sorted(used)} of {num_views}, type {answer_type!r}")
        if not used <= remap.keys():
            continue  # the caller decoded a view subset that does not contain this question's views
        out.append(QAPair(question=_text(qa["question"][i]), answer=_text(qa["answer"][i]),
                          answer_type=answer_type, task=_text(qa["task"][i]), choices=choices,
                          views=tuple(remap[x] for x in views),
                          markers=tuple((remap[m[0]], m[1], m[2], m[3]) for m in markers)))
    return tuple(out)


def record_to_scene(record: dict, *, strict: bool = True, views: Sequence[int] | None = None) -> Scene:
    """Decodes a record (as returned by `tfds.data_source(...)[i]`) into a Scene.

    views:  decode only these view indices (in this order); QA pairs that need other views are
            dropped and the rest renumbered. None = all views.
    strict: True raises BadRecordError on any bad depth map (NaN/inf, negative, all zero). False sets
            bad depth pixels to 0 ("no value", masked out of the losses) and keeps empty views.
            Corrupt bytes, bad cameras, size and count mismatches raise in both modes.
    """
    rid = _text(record.get("scene_id", "?"))
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise BadRecordError("missing_field", rid, f"missing {missing}")
    intrinsics = np.asarray(record["intrinsics"], dtype=np.float32).reshape(-1, 3, 3)
    c2w = np.asarray(record["c2w"], dtype=np.float32).reshape(-1, 4, 4)
    n = len(record["images"])
    if not n == len(record["depth"]) == len(intrinsics) == len(c2w) or n == 0:
        raise BadRecordError("view_count_mismatch", rid, f"images {n}, depth {len(record['depth'])}, "
                             f"intrinsics {len(intrinsics)}, c2w {len(c2w)}")
    selected = list(range(n)) if views is None else [int(v) for v in views]
    if not selected or any(not 0 <= v < n for v in selected):
        raise ValueError(f"record {rid!r}: views {selected} must be a non-empty subset of range({n})")
    _check_cameras(intrinsics[selected], c2w[selected], rid)
    shape = (int(record["height"]), int(record["width"]))
    decoded = [_decode_view(record, v, shape, rid, strict) for v in selected]
    return Scene(scene_id=rid, dataset=_text(record["dataset"]),
                 images=np.stack([d[0] for d in decoded]), depth=np.stack([d[1] for d in decoded]),
                 intrinsics=intrinsics[selected], c2w=c2w[selected], z_far=float(record["z_far"]),
                 normal_loss=bool(record["normal_loss"]), qa=_decode_qa(record, selected, n, rid))


# --------------------------------------------------------------------------------------------------
# General VQA samples (images + a conversation; no geometry)
# --------------------------------------------------------------------------------------------------
ROLES = ("system", "user", "assistant")
VQA_ANSWER_TYPES = ("", "numeric", "choice")  # '' = free-form text


@dataclasses.dataclass(frozen=True)
class VQASample:
    """A general VQA sample. The images go at the start of the first user turn (SPEC 1.4).

    images:      uint8[H_i, W_i, 3] each (sizes may differ)
    turns:       ((role, text), ...): an optional system turn first, then user / assistant turns
                 alternating, starting with user and ending with assistant (every assistant turn is
                 trained with CE)
    answer_type: '' (free-form), 'numeric' or 'choice': how an evaluator scores the last answer
    choices:     option texts of a 'choice' question ("A. ...", ...), already part of the user text
    """

    sample_id: str
    dataset: str
    images: tuple[np.ndarray, ...]
    turns: tuple[tuple[str, str], ...]
    answer_type: str = ""
    choices: tuple[str, ...] = ()

    def check(self) -> None:
        roles = [r for r, _ in self.turns]
        chat = roles[1:] if roles[:1] == ["system"] else roles
        alternating = all(r == ("user", "assistant")[i % 2] for i, r in enumerate(chat))
        if not chat or not alternating or len(chat) % 2:
            raise ValueError(f"VQA sample {self.sample_id!r}: roles {roles} must be an optional system turn, then "
                             f"user / assistant turns alternating from user to assistant (roles from {ROLES})")
        if self.answer_type not in VQA_ANSWER_TYPES:
            raise ValueError(f"VQA sample {self.sample_id!r}: answer_type {self.answer_type!r} is not one of "
                             f"{VQA_ANSWER_TYPES}")
        for im in self.images:
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"VQA sample {self.sample_id!r}: image is {im.dtype}{list(im.shape)}, "
                                 "expected uint8[H, W, 3]")


def vqa_features() -> tfds.features.FeaturesDict:
    """tfds features of a VQA record: sample_id, dataset, images (encoded bytes), roles, texts,
    answer_type and choices (JSON list)."""
    text = tfds.features.Text
    return tfds.features.FeaturesDict({
        "sample_id": text(), "dataset": text(), "images": _bytes_sequence(),
        "roles": tfds.features.Sequence(text()), "texts": tfds.features.Sequence(text()),
        "answer_type": text(), "choices": text(),
    })


def vqa_to_record(sample: VQASample, *, image_format: str = "jpeg") -> dict:
    """Encodes a VQASample into a dict matching `vqa_features()`; raises ValueError on a malformed sample."""
    sample.check()
    return {"sample_id": sample.sample_id, "dataset": sample.dataset,
            "images": [encode_image(im, image_format) for im in sample.images],
            "roles": [r for r, _ in sample.turns], "texts": [t for _, t in sample.turns],
            "answer_type": sample.answer_type, "choices": json.dumps(list(sample.choices))}


def record_to_vqa(record: dict) -> VQASample:
    """Decodes a VQA record; raises BadRecordError ('missing_field', 'corrupt_image', 'bad_qa')."""
    rid = _text(record.get("sample_id", "?"))
    missing = [k for k in ("sample_id", "dataset", "images", "roles", "texts", "answer_type", "choices")
               if k not in record]
    if missing:
        raise BadRecordError("missing_field", rid, f"missing {missing}")
    try:
        images = tuple(decode_image(b) for b in record["images"])
    except (OSError, ValueError, SyntaxError) as e:
        raise BadRecordError("corrupt_image", rid, str(e)) from None
    if len(record["roles"]) != len(record["texts"]):
        raise BadRecordError("bad_qa", rid, "roles and texts differ in length")
    try:
        choices = tuple(str(c) for c in json.loads(_text(record["choices"])))
        sample = VQASample(rid, _text(record["dataset"]), images,
                           tuple((_text(r), _text(t)) for r, t in zip(record["roles"], record["texts"])),
                           answer_type=_text(record["answer_type"]), choices=choices)
        sample.check()
    except (ValueError, TypeError) as e:
        raise BadRecordError("bad_qa", rid, str(e)) from None
    return sample
