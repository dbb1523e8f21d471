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


def check_batch(batch: PackedBatch) -> None:
    """Raises ValueError naming the field whose shape breaks the contract above."""
    b, l = batch.token_ids.shape
    b2, s, v, h, w, c = batch.geo_images.shape
    n = batch.sem_images.shape[1]
    if h % GEO_PATCH or w % GEO_PATCH or c != 3:
        raise ValueError(f"geo_images {batch.geo_images.shape}: H and W must be multiples of {GEO_PATCH}, 3 channels")
    expect = {
        "token_type": (b, l), "positions": (b, 3, l), "seq_order": (b, l), "document_ids": (b, l),
        "split_ids": (b, l), "split_full": (b, l), "geo_frame": (b, l), "labels": (b, l), "loss_mask": (b, l),
        "geo_images": (b, s, v, h, w, 3), "sample_valid": (b, s), "sem_image_valid": (b, n),
        "gt_world_points": (b, s, v, h, w, 3), "gt_valid": (b, s, v, h, w), "gt_poses": (b, s, v, 4, 4),
        "gt_intrinsics": (b, s, v, 3, 3), "normal_loss_enabled": (b, s),
    }
    for name, shape in expect.items():
        got = tuple(getattr(batch, name).shape)
        if got != shape:
            raise ValueError(f"PackedBatch.{name} has shape {got}, expected {shape} (see g2vlm_jax/batch.py)")
    if batch.num_geo_tokens > l:
        raise ValueError(f"PackedBatch: {batch.num_geo_tokens} geometry slots do not fit in rows of length {l}")
    hs, ws = batch.sem_images.shape[2:4]
    if n and (hs % VIT_MERGED_PATCH or ws % VIT_MERGED_PATCH):
        raise ValueError(f"sem_images {batch.sem_images.shape}: Hs and Ws must be multiples of {VIT_MERGED_PATCH}")
    ts = (hs // VIT_MERGED_PATCH) * (ws // VIT_MERGED_PATCH) if n else batch.sem_token_pos.shape[2]
    if tuple(batch.sem_token_pos.shape) != (b, n, ts):
        raise ValueError(f"PackedBatch.sem_token_pos has shape {tuple(batch.sem_token_pos.shape)}, expected {(b, n, ts)}")
