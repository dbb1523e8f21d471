"""The packed batch: the one contract between `data_pipelines` and the model.

A batch holds B *packs*. A pack is one row of L token slots holding several samples (documents).
Every sample of a pack has the same number of geometry frames V and the same frame size (H, W)
(SPEC 3: each pack draws V and the aspect ratio once), so geometry data is a dense
`[B, S, V, ...]` block, where S is the number of sample slots of the pack bucket.

Expert-grouped layout
---------------------
Each row is stored **grouped by expert**, not in reading order:

    slots [0, Lu)          semantic-expert tokens: text, image start/end markers, ViT slots, padding
    slots [Lu, Lu + Lg)    geometry-expert tokens: the DINO slots, Lg = S * V * h * w,
                           slot Lu + ((s * V + v) * h + i) * w + j  holds patch (i, j) of frame v of sample s

so each MoT expert runs on a contiguous static slice (the SPEC 1.1 compute rule: no expert ever
computes on the other expert's tokens) and the geometry tokens reshape to `[B, S, V, h*w, D]` for
the heads without any gather. Reading order is kept in `seq_order`: attention's causal rule compares
`seq_order`, never the slot index. h = H / 14, w = W / 14.

Attention rule (SPEC 1.4), evaluated per (query, key) pair of a row:

    allowed = same document (document_ids > 0)
              AND (  seq_order[k] <= seq_order[q]                        # causal
                  OR split_ids[k] == split_ids[q] AND split_full[q]      # inside one image block
                  OR geometry rule (geo_attention mode, geo_frame of both) )

where the geometry rule is: `global` -> both tokens belong to geometry frames (geo_frame >= 0);
`block_causal` -> 0 <= geo_frame[k] <= geo_frame[q]; `frame` -> nothing extra; `mixed` -> `frame` in
even layers, `global` in odd ones.

Fields (int32 unless noted; B packs, L = Lu + Lg slots, S sample slots, V views, N semantic images)
-----------------------------------------------------------------------------------------------
token_ids        [B, L]        text token id; 0 at encoder slots and padding
token_type       [B, L]        0 padding, 1 text (incl. markers), 2 ViT slot, 3 DINO slot
positions        [B, 3, L]     M-RoPE (t, h, w) ids
seq_order        [B, L]        reading-order index within the row (padding: a large value)
document_ids     [B, L]        1.. per sample within the row; 0 = padding
split_ids        [B, L]        1.. per split within the row; 0 = padding
split_full       bool [B, L]   the token's split is bidirectional (image blocks)
geo_frame        [B, L]        frame index v within its sample for every token of a geometry-frame
                               split (markers included); -1 otherwise
labels           [B, L]        next-token target at CE loss positions, 0 elsewhere
loss_mask        float32 [B, L]  1.0 at CE loss positions
geo_images       float32 [B, S, V, H, W, 3]  geometry-encoder frames in [0, 1]
sample_valid     bool [B, S]   sample slot s of pack b holds a real sample
sem_images       float32 [B, N, Hs, Ws, 3]   semantic-encoder images in [0, 1] (N may be 0)
sem_image_valid  bool [B, N]
sem_token_pos    [B, N, Ts]    slot (< Lu) of each merged ViT token, Ts = (Hs/28)*(Ws/28); L for
                               invalid images (their writes are dropped)
Ground truth for the visual-geometry loss (all views of a sample expressed in world frame):
gt_world_points  float32 [B, S, V, H, W, 3]
gt_valid         bool [B, S, V, H, W]
gt_poses         float32 [B, S, V, 4, 4]   camera-to-world
gt_intrinsics    float32 [B, S, V, 3, 3]
normal_loss_enabled bool [B, S]
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct

TOKEN_PAD, TOKEN_TEXT, TOKEN_VIT, TOKEN_DINO = 0, 1, 2, 3
GEO_PATCH = 14  # DINO patch size: geometry tokens per frame = (H/14) * (W/14)
VIT_MERGED_PATCH = 28  # ViT patch (14) x spatial merge (2): semantic tokens per image = (Hs/28) * (Ws/28)
PAD_ORDER = 2**30  # seq_order of padding slots (after every real token)


@struct.dataclass
class PackedBatch:
    """A batch of packed rows in the expert-grouped layout (see the module docstring)."""

    token_ids: jax.Array
    token_type: jax.Array
    positions: jax.Array
    seq_order: jax.Array
    document_ids: jax.Array
    split_ids: jax.Array
    split_full: jax.Array
    geo_frame: jax.Array
    labels: jax.Array
    loss_mask: jax.Array
    geo_images: jax.Array
    sample_valid: jax.Array
    sem_images: jax.Array
    sem_image_valid: jax.Array
    sem_token_pos: jax.Array
    gt_world_points: jax.Array
    gt_valid: jax.Array
    gt_poses: jax.Array
    gt_intrinsics: jax.Array
    normal_loss_enabled: jax.Array

    # ---- static facts derived from shapes -----------------------------------------------------
    @property
    def num_geo_tokens(self) -> int:
        """Lg: geometry slots at the end of every row."""
        _, s, v, h, w, _ = self.geo_images.shape
        return s * v * (h // GEO_PATCH) * (w // GEO_PATCH)

    @property
    def num_sem_tokens(self) -> int:
        """Lu: semantic-expert slots at the start of every row."""
        return self.token_ids.shape[1] - self.num_geo_tokens

    @property
    def geo_grid(self) -> tuple[int, int]:
        """(h, w) patch grid of every geometry frame."""
        return self.geo_images.shape[3] // GEO_PATCH, self.geo_images.shape[4] // GEO_PATCH

    def as_numpy_dict(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PackedBatch))


@struct.dataclass
class GeometryTruth:
    """Ground truth of N samples, as the visual-geometry loss and the evaluators read it: the batch's
    `gt_*`, `sample_valid` and `normal_loss_enabled` fields with the sample axes [B, S] flattened to N.

    world_points         float32[N, V, H, W, 3]  all views in the world frame
    valid                bool[N, V, H, W]
    poses                float32[N, V, 4, 4]     camera-to-world
    normal_loss_enabled  bool[N]
    sample_valid         bool[N]                 the slot holds a real sample
    """

    world_points: jax.Array
    valid: jax.Array
    poses: jax.Array
    normal_loss_enabled: jax.Array
    sample_valid: jax.Array

    @classmethod
    def from_batch(cls, batch: PackedBatch) -> "GeometryTruth":
        flat = lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
        return cls(world_points=flat(batch.gt_world_points), valid=flat(batch.gt_valid), poses=flat(batch.gt_poses),
                   normal_loss_enabled=flat(batch.normal_loss_enabled), sample_valid=flat(batch.sample_valid))
# Per-sample images, semantic images and ground truth; the other fields are per-token (data_pipelines/sequence.pack_row).
IMAGE_FIELDS = ("geo_images", "sample_valid", "sem_images", "sem_image_valid", "gt_world_points", "gt_valid",
                "gt_poses", "gt_intrinsics", "normal_loss_enabled")
TOKEN_FIELDS: tuple[str, ...] = tuple(n for n in FIELD_NAMES if n not in IMAGE_FIELDS)
IDENTITY = "identity"  # padding value of the pose / intrinsics fields: identity matrices


@dataclasses.dataclass(frozen=True)
class RowShape:
    """Static shape of a packed row for one bucket: L = Lu + S * V * gh * gw; N semantic image slots."""

    length: int
    sample_slots: int
    views: int
    height: int
    width: int
    sem_slots: int
    sem_height: int
    sem_width: int

    @property
    def geo_tokens_per_sample(self) -> int:
        return self.views * (self.height // GEO_PATCH) * (self.width // GEO_PATCH)

    @property
    def num_geo(self) -> int:
        return self.sample_slots * self.geo_tokens_per_sample

    @property
    def num_sem(self) -> int:
        return self.length - self.num_geo

    @property
    def sem_tokens_per_image(self) -> int:
        return (self.sem_height // VIT_MERGED_PATCH) * (self.sem_width // VIT_MERGED_PATCH)


def row_fields(shape: RowShape) -> dict[str, tuple[tuple[int, ...], type, object]]:
    """The one table of PackedBatch fields: name -> (shape of one row, dtype, padding value).

    A batch field is [B] + the row shape. The padding value is what an unused slot holds (the
    field table of the module docstring says what each means); `IDENTITY` = identity matrices.
    """
    l, s, v, h, w = shape.length, shape.sample_slots, shape.views, shape.height, shape.width
    n, hs, ws, ts = shape.sem_slots, shape.sem_height, shape.sem_width, shape.sem_tokens_per_image
    i32, f32, b8 = np.int32, np.float32, np.bool_
    return {
        "token_ids": ((l,), i32, 0), "token_type": ((l,), i32, TOKEN_PAD), "positions": ((3, l), i32, 0),
        "seq_order": ((l,), i32, PAD_ORDER), "document_ids": ((l,), i32, 0), "split_ids": ((l,), i32, 0),
        "split_full": ((l,), b8, False), "geo_frame": ((l,), i32, -1), "labels": ((l,), i32, 0),
        "loss_mask": ((l,), f32, 0.0),
        "geo_images": ((s, v, h, w, 3), f32, 0.0), "sample_valid": ((s,), b8, False),
        "sem_images": ((n, hs, ws, 3), f32, 0.0), "sem_image_valid": ((n,), b8, False),
        "sem_token_pos": ((n, ts), i32, l),  # the row length: writes of unused image slots are dropped
        "gt_world_points": ((s, v, h, w, 3), f32, 0.0), "gt_valid": ((s, v, h, w), b8, False),
        "gt_poses": ((s, v, 4, 4), f32, IDENTITY), "gt_intrinsics": ((s, v, 3, 3), f32, IDENTITY),
        "normal_loss_enabled": ((s,), b8, False),
    }


def empty_row(shape: RowShape, names=FIELD_NAMES) -> dict[str, np.ndarray]:
    """Fields `names` of one row of `shape`, every slot holding its padding value."""
    out = {}
    for name, (dims, dtype, pad) in row_fields(shape).items():
        if name in names:
            out[name] = (np.broadcast_to(np.eye(dims[-1], dtype=dtype), dims).copy() if pad is IDENTITY
                         else np.full(dims, pad, dtype))
    return out


def row_shape_of(batch: PackedBatch) -> RowShape:
    """The RowShape of a batch's rows, read off its token and image fields."""
    _, l = batch.token_ids.shape
    _, s, v, h, w, _ = batch.geo_images.shape
    _, n, hs, ws, _ = batch.sem_images.shape
    return RowShape(l, s, v, h, w, n, hs, ws)


def check_batch(batch: PackedBatch) -> None:
    """Raises ValueError naming the field whose shape breaks the contract above (`row_fields`)."""
    b = batch.token_ids.shape[0]
    shape = row_shape_of(batch)
    if shape.height % GEO_PATCH or shape.width % GEO_PATCH or batch.geo_images.shape[-1] != 3:
        raise ValueError(f"geo_images {batch.geo_images.shape}: H and W must be multiples of {GEO_PATCH}, 3 channels")
    n, hs, ws = shape.sem_slots, shape.sem_height, shape.sem_width
    if n and (hs % VIT_MERGED_PATCH or ws % VIT_MERGED_PATCH):
        raise ValueError(f"sem_images {batch.sem_images.shape}: Hs and Ws must be multiples of {VIT_MERGED_PATCH}")
    for name, (dims, _, _) in row_fields(shape).items():
        if name == "sem_token_pos" and not n:
            dims = (0,) + tuple(batch.sem_token_pos.shape[2:])  # no images: any token count per image
        got, expected = tuple(getattr(batch, name).shape), (b,) + tuple(dims)
        if got != expected:
            raise ValueError(f"PackedBatch.{name} has shape {got}, expected {expected} (see g2vlm_jax/batch.py)")
    if batch.num_geo_tokens > shape.length:
        raise ValueError(f"PackedBatch: {batch.num_geo_tokens} geometry slots do not fit in rows of length "
                         f"{shape.length}")
