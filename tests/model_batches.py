"""Test-only: hand-built `PackedBatch`es for tiny shapes (the real sequence builder is in data_pipelines).

A row is a list of samples; a sample is a list of items, laid out in reading order:

    ("text", n)     n causal text tokens
    ("answer", n)   n causal text tokens that are CE loss positions
    ("geo",)        the sample's V geometry frames; frame v = one full split [start, h*w patches, end]
    ("sem",)        the row's next semantic image: one full split [start, Ts ViT slots, end]

Slots follow the expert-grouped layout of g2vlm_jax/batch.py: semantic-expert tokens fill [0, Lu) in
reading order, geometry patch (i, j) of frame v of sample s sits at Lu + ((s*V + v)*h + i)*w + j,
everything else is padding. M-RoPE positions follow SPEC 1.4 (restart at 0 per sample).
"""
from __future__ import annotations

import jax
import numpy as np

from g2vlm_jax.batch import GEO_PATCH, PAD_ORDER, TOKEN_DINO, TOKEN_TEXT, TOKEN_VIT, VIT_MERGED_PATCH, PackedBatch, check_batch

VISION_START_OFFSET, VISION_END_OFFSET = 2, 1  # marker ids: vocab - 2 and vocab - 1


class _Row:
    """Mutable per-row arrays plus the cursors used while laying out one row."""

    def __init__(self, lu: int, lg: int, n_images: int, ts: int):
        l = lu + lg
        self.lu, self.length = lu, l
        self.token_ids = np.zeros(l, np.int32)
        self.token_type = np.zeros(l, np.int32)
        self.positions = np.zeros((3, l), np.int32)
        self.seq_order = np.full(l, PAD_ORDER, np.int32)
        self.document_ids = np.zeros(l, np.int32)
        self.split_ids = np.zeros(l, np.int32)
        self.split_full = np.zeros(l, bool)
        self.geo_frame = np.full(l, -1, np.int32)
        self.labels = np.zeros(l, np.int32)
        self.loss_mask = np.zeros(l, np.float32)
        self.sem_token_pos = np.full((n_images, ts), l, np.int32)
        self.sem_image_valid = np.zeros(n_images, bool)
        self.next_sem_slot = self.order = self.split = self.image = 0

    def put(self, slot, *, token, ttype, pos, doc, full, frame):
        self.token_ids[slot], self.token_type[slot] = token, ttype
        self.positions[:, slot] = pos
        self.seq_order[slot], self.document_ids[slot], self.split_ids[slot] = self.order, doc, self.split
        self.split_full[slot], self.geo_frame[slot] = full, frame
        self.order += 1

    def sem_slot(self) -> int:
        if self.next_sem_slot >= self.lu:
            raise ValueError(f"row needs more than Lu={self.lu} semantic slots")
        self.next_sem_slot += 1
        return self.next_sem_slot - 1


def make_batch(rows, *, views: int, geo_hw=(28, 28), sample_slots: int = 2, num_sem_images: int = 1,
               sem_hw=(56, 56), sem_len: int = 40, vocab: int = 512, seed: int = 0) -> PackedBatch:
    """Builds a valid PackedBatch from row specs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    h, w = geo_hw[0] // GEO_PATCH, geo_hw[1] // GEO_PATCH
    gh, gw = sem_hw[0] // VIT_MERGED_PATCH, sem_hw[1] // VIT_MERGED_PATCH
    lg = sample_slots * views * h * w
    built, sample_valid = [], np.zeros((len(rows), sample_slots), bool)
    for b, samples in enumerate(rows):
        if len(samples) > sample_slots:
            raise ValueError(f"row {b} has {len(samples)} samples, more than sample_slots={sample_slots}")
        row = _Row(sem_len, lg, num_sem_images, gh * gw)
        for s, items in enumerate(samples):
            p = 0
            for item in items:
                kind = item[0]
                if kind in ("text", "answer"):
                    row.split += 1
                    for _ in range(item[1]):
                        slot = row.sem_slot()
                        row.put(slot, token=rng.integers(1, vocab - 2), ttype=TOKEN_TEXT, pos=p, doc=s + 1, full=False,
                                frame=-1)
                        if kind == "answer":
                            row.loss_mask[slot], row.labels[slot] = 1.0, rng.integers(1, vocab)
                        p += 1
                elif kind == "geo":
                    sample_valid[b, s] = True
                    for v in range(views):
                        row.split += 1
                        p = _image_split(row, rng, p, s + 1, v, vocab, h, w,
                                         lambda i, j, v=v: sem_len + ((s * views + v) * h + i) * w + j, TOKEN_DINO)
                elif kind == "sem":
                    n = row.image
                    if n >= num_sem_images:
                        raise ValueError(f"row {b} uses more than num_sem_images={num_sem_images} semantic images")
                    row.split += 1
                    p = _image_split(row, rng, p, s + 1, -1, vocab, gh, gw, None, TOKEN_VIT, image=n)
                    row.sem_image_valid[n] = True
                    row.image += 1
                else:
                    raise ValueError(f"unknown item kind {kind!r}")
        built.append(row)
    return _assemble(built, rng, sample_valid, views, geo_hw, sem_hw, num_sem_images)


def _image_split(row, rng, p, doc, frame, vocab, gh, gw, geo_slot, ttype, image=None) -> int:
    """Writes [start, gh*gw image tokens, end] of one image split; returns the next M-RoPE counter."""
    row.put(row.sem_slot(), token=vocab - VISION_START_OFFSET, ttype=TOKEN_TEXT, pos=p, doc=doc, full=True, frame=frame)
    p += 1
    for i in range(gh):
        for j in range(gw):
            slot = geo_slot(i, j) if geo_slot is not None else row.sem_slot()
            row.put(slot, token=0, ttype=ttype, pos=(p, p + i, p + j), doc=doc, full=True, frame=frame)
            if image is not None:
                row.sem_token_pos[image, i * gw + j] = slot
    p += max(gh, gw)
    row.put(row.sem_slot(), token=vocab - VISION_END_OFFSET, ttype=TOKEN_TEXT, pos=p, doc=doc, full=True, frame=frame)
    return p + 1


def _assemble(rows, rng, sample_valid, views, geo_hw, sem_hw, num_sem_images) -> PackedBatch:
    b, s = sample_valid.shape
    H, W = geo_hw
    stack = lambda name: np.stack([getattr(r, name) for r in rows])
    poses = np.tile(np.eye(4, dtype=np.float32), (b, s, views, 1, 1))
    poses[..., :3, 3] = rng.normal(size=(b, s, views, 3)).astype(np.float32)
    k = np.array([[W, 0, W / 2], [0, W, H / 2], [0, 0, 1]], np.float32)
    batch = PackedBatch(
        token_ids=stack("token_ids"), token_type=stack("token_type"), positions=stack("positions"),
        seq_order=stack("seq_order"), document_ids=stack("document_ids"), split_ids=stack("split_ids"),
        split_full=stack("split_full"), geo_frame=stack("geo_frame"), labels=stack("labels"),
        loss_mask=stack("loss_mask"),
        geo_images=rng.uniform(size=(b, s, views, H, W, 3)).astype(np.float32),
        sample_valid=sample_valid,
        sem_images=rng.uniform(size=(b, num_sem_images, *sem_hw, 3)).astype(np.float32),
        sem_image_valid=stack("sem_image_valid"), sem_token_pos=stack("sem_token_pos"),
        gt_world_points=rng.normal(size=(b, s, views, H, W, 3)).astype(np.float32),
        gt_valid=np.broadcast_to(sample_valid[:, :, None, None, None], (b, s, views, H, W)).copy(),
        gt_poses=poses, gt_intrinsics=np.broadcast_to(k, (b, s, views, 3, 3)).copy(),
        normal_loss_enabled=sample_valid.copy(),
    )
    check_batch(batch)
    return batch


def standard_rows(num_rows: int = 2):
    """A mix exercising every feature: prefix text, geometry frames, a semantic image, answers, two
    documents in one row, an empty sample slot (row 1) and padding."""
    pattern = [
        [[("text", 3), ("geo",), ("sem",), ("text", 2), ("answer", 3)], [("text", 2), ("geo",), ("answer", 2)]],
        [[("text", 2), ("geo",), ("answer", 3)]],
    ]
    return [pattern[i % 2] for i in range(num_rows)]


def standard_batch(num_rows: int = 2, views: int = 3, seed: int = 0, **kw) -> PackedBatch:
    return make_batch(standard_rows(num_rows), views=views, seed=seed, **kw)


def permute_frames(batch: PackedBatch, perm) -> PackedBatch:
    """The batch whose frame v holds the old frame perm[v] of every sample, each frame keeping its own
    tokens' metadata (positions, reading order, markers): a relabelling of the views, nothing else.

    Geometry slots of frame v take the metadata of the old frame perm[v]'s slots; the marker slots of
    frame v (in the semantic part) take those of the old frame perm[v]'s markers.
    """
    perm = np.asarray(perm)
    b, s, v = batch.geo_images.shape[:3]
    lu, (h, w) = batch.num_sem_tokens, batch.geo_grid
    index = np.tile(np.arange(batch.token_ids.shape[1]), (b, 1))
    geo_index = index[:, lu:].reshape(b, s, v, h * w)
    index[:, lu:] = geo_index[:, :, perm].reshape(b, -1)
    frame = np.asarray(batch.geo_frame)
    for bi in range(b):
        for si in range(s):
            doc = np.asarray(batch.document_ids)[bi, lu + si * v * h * w]  # document of this sample slot
            if doc == 0:
                continue
            for new_v, old_v in enumerate(perm):
                markers = lambda fv: np.where((frame[bi, :lu] == fv) & (np.asarray(batch.document_ids)[bi, :lu] == doc))[0]
                index[bi, markers(new_v)] = markers(old_v)
    take = lambda a: np.take_along_axis(np.asarray(a), index, axis=1)
    fields = {name: take(getattr(batch, name)) for name in ("token_ids", "token_type", "seq_order", "document_ids",
                                                             "split_ids", "split_full", "labels", "loss_mask")}
    fields["positions"] = np.take_along_axis(np.asarray(batch.positions), index[:, None, :], axis=2)
    fields["geo_frame"] = np.asarray(batch.geo_frame)  # frame v stays frame v
    per_view = lambda a: np.asarray(a)[:, :, perm]
    return batch.replace(**fields, geo_images=per_view(batch.geo_images), gt_world_points=per_view(batch.gt_world_points),
                         gt_valid=per_view(batch.gt_valid), gt_poses=per_view(batch.gt_poses),
                         gt_intrinsics=per_view(batch.gt_intrinsics))


# Tests do not need fast machine code, only fast compiles: LLVM optimisation level 0 roughly halves
# XLA:CPU compile time of the small programs the model tests build (their runtime is negligible).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_jit(fn, **kwargs):
    """`jax.jit` with test-friendly compiler options."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def random_mask_info(rng: np.random.Generator, length: int, rows: int = 1):
    """Structured random attention metadata (`mask.MaskInfo`, numpy fields [rows, length]).

    Small id ranges, so that many (query block, key block) tiles are empty and many are not; reading
    orders are a shuffled sorted draw (slot order is not reading order, as in the expert-grouped rows).
    """
    from g2vlm_jax.model.mask import MaskInfo

    shape = (rows, length)
    doc = np.sort(rng.integers(0, 3, shape), axis=1)
    frame = np.where(rng.random(shape) < 0.5, rng.integers(0, 3, shape), -1)
    order = np.sort(rng.integers(0, 40, shape), axis=1)[:, rng.permutation(length)]
    return MaskInfo(seq_order=order.astype(np.int32), document_ids=doc.astype(np.int32),
                    split_ids=rng.integers(0, 5, shape).astype(np.int32), split_full=rng.random(shape) < 0.3,
                    geo_frame=frame.astype(np.int32))
