"""Items -> one sample's token sequence (SPEC 1.4) -> packed rows of the PackedBatch contract.

A sample is built in reading order by `SequenceBuilder`: text items (causal splits, optionally
trained with CE), geometry frames and semantic images (each one full split
`[<|vision_start|>, slots, <|vision_end|>]`). M-RoPE positions restart at 0 per sample:

    text token       (p, p, p); p += 1
    image            start marker (p, p, p); p += 1
                     slot (i, j) of the gh x gw grid: (p, p + i, p + j); then p += max(gh, gw)
                     end marker (p, p, p); p += 1

`pack_row` places several samples in one row of `g2vlm_jax/batch.py`'s expert-grouped layout:
semantic-expert tokens (text, markers, ViT slots) first in reading order, then the geometry slots of
sample slot s, frame v, patch (i, j) at Lu + ((s * V + v) * gh + i) * gw + j.

Worked example (`recon_sample` with 2 frames of 28x28 = 2x2 patches, prompt of 2 tokens a b):

    token   a  b  <vs> g g g g <ve> <vs> g g g g <ve>
    t       0  1   2   3 3 3 3  5    6   7 7 7 7  9
    h       0  1   2   3 3 4 4  5    6   7 7 8 8  9
    w       0  1   2   3 4 3 4  5    6   7 8 7 8  9
"""
from __future__ import annotations

import dataclasses

import numpy as np

from g2vlm_jax.batch import GEO_PATCH, PAD_ORDER, TOKEN_DINO, TOKEN_TEXT, TOKEN_VIT, VIT_MERGED_PATCH
from g2vlm_jax.tokenizer import Tokenizer

RECON_PROMPT = "Reconstruct the 3D scene."
SYSTEM_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ASSISTANT_TURN = "<|im_end|>\n<|im_start|>assistant"


@dataclasses.dataclass
class SampleTokens:
    """One sample in reading order (n tokens).

    token_ids, token_type, split, geo_frame, labels: int32[n]; positions: int32[3, n];
    split_full: bool[n]; loss_mask: float32[n]; num_frames / geo_grid / sem_grids describe the
    encoder slots so the packer can place them.
    """

    token_ids: np.ndarray
    token_type: np.ndarray
    positions: np.ndarray
    split: np.ndarray
    split_full: np.ndarray
    geo_frame: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    num_frames: int
    geo_grid: tuple[int, int]
    num_sem_images: int

    @property
    def num_semantic_tokens(self) -> int:
        return int(np.sum(self.token_type != TOKEN_DINO))

    @property
    def num_text_tokens(self) -> int:
        return int(np.sum(self.token_type == TOKEN_TEXT))


class SequenceBuilder:
    """Appends items in reading order, tracking the M-RoPE counter and split ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.cols = {k: [] for k in ("ids", "type", "t", "h", "w", "split", "full", "frame", "labels", "loss")}
        self.p = 0
        self.split = 0
        self.frames = 0
        self.geo_grid = (0, 0)
        self.sem_images = 0

    def _push(self, ids, typ, t, h, w, full, frame, labels=None, loss=None):
        n = len(ids)
        c = self.cols
        c["ids"] += list(ids)
        c["type"] += [typ] * n if np.isscalar(typ) else list(typ)
        c["t"] += list(t)
        c["h"] += list(h)
        c["w"] += list(w)
        c["split"] += [self.split] * n
        c["full"] += [full] * n
        c["frame"] += [frame] * n
        c["labels"] += list(labels) if labels is not None else [0] * n
        c["loss"] += list(loss) if loss is not None else [0.0] * n

    def text(self, text: str, *, loss: bool = False, next_id: int | None = None) -> None:
        """A causal text item. With `loss`, each token predicts the next one and the last predicts `next_id`."""
        ids = self.tok.encode(text)
        if not ids:
            return
        self.split += 1
        pos = list(range(self.p, self.p + len(ids)))
        self.p += len(ids)
        labels = (ids[1:] + [next_id]) if loss else None
        self._push(ids, TOKEN_TEXT, pos, pos, pos, False, -1, labels, [1.0] * len(ids) if loss else None)

    def _image(self, gh: int, gw: int, slot_type: int, frame: int) -> None:
        sp = self.tok.special
        self.split += 1
        self._push([sp.vision_start], TOKEN_TEXT, [self.p], [self.p], [self.p], True, frame)
        self.p += 1
        ii, jj = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        n = gh * gw
        self._push([0] * n, slot_type, [self.p] * n, (self.p + ii).reshape(-1), (self.p + jj).reshape(-1), True, frame)
        self.p += max(gh, gw)
        self._push([sp.vision_end], TOKEN_TEXT, [self.p], [self.p], [self.p], True, frame)
        self.p += 1

    def geometry_frames(self, views: int, height: int, width: int) -> None:
        """`views` geometry-encoder frames of height x width pixels (one full split each)."""
        gh, gw = height // GEO_PATCH, width // GEO_PATCH
        for v in range(views):
            self._image(gh, gw, TOKEN_DINO, frame=v)
        self.frames, self.geo_grid = views, (gh, gw)

    def semantic_image(self, height: int, width: int) -> None:
        self._image(height // VIT_MERGED_PATCH, width // VIT_MERGED_PATCH, TOKEN_VIT, frame=-1)
        self.sem_images += 1

    def build(self) -> SampleTokens:
        c = self.cols
        return SampleTokens(
            token_ids=np.asarray(c["ids"], np.int32), token_type=np.asarray(c["type"], np.int32),
            positions=np.asarray([c["t"], c["h"], c["w"]], np.int32), split=np.asarray(c["split"], np.int32),
            split_full=np.asarray(c["full"], bool), geo_frame=np.asarray(c["frame"], np.int32),
            labels=np.asarray(c["labels"], np.int32), loss_mask=np.asarray(c["loss"], np.float32),
            num_frames=self.frames, geo_grid=self.geo_grid, num_sem_images=self.sem_images)


def recon_sample(tok: Tokenizer, views: int, height: int, width: int) -> SampleTokens:
    """Stage-1 layout: the reconstruction prompt (causal, no BOS), then the geometry frames."""
    b = SequenceBuilder(tok)
    b.text(RECON_PROMPT)
    b.geometry_frames(views, height, width)
    return b.build()


def _answer(b: SequenceBuilder, answer: str) -> None:
    """`\\n`+answer trained with CE (last token predicts <|im_end|>), then the extra <|im_end|> input."""
    im_end = b.tok.special.im_end
    b.text("\n" + answer, loss=True, next_id=im_end)
    b.text("<|im_end|>")


def _images_question_answer(b: SequenceBuilder, num_sem: int, sem_height: int, sem_width: int, question: str,
                            answer: str) -> SampleTokens:
    """The shared end of the chat layouts: semantic images, question, assistant turn, trained answer."""
    for _ in range(num_sem):
        b.semantic_image(sem_height, sem_width)
    b.text(question)
    b.text(ASSISTANT_TURN)
    _answer(b, answer)
    return b.build()


def recon_qa_sample(tok: Tokenizer, views: int, height: int, width: int, num_sem: int, sem_height: int,
                    sem_width: int, question: str, answer: str) -> SampleTokens:
    """Stage-2 layout: chat prefix, prompt, geometry frames, semantic images, question, answer."""
    b = SequenceBuilder(tok)
    b.text(SYSTEM_PREFIX)
    b.text(RECON_PROMPT)
    b.geometry_frames(views, height, width)
    return _images_question_answer(b, num_sem, sem_height, sem_width, question, answer)


def vqa_sample(tok: Tokenizer, num_sem: int, sem_height: int, sem_width: int, question: str, answer: str) -> SampleTokens:
    """General VQA: chat template with the semantic images at the start of the first user turn."""
    b = SequenceBuilder(tok)
    b.text(SYSTEM_PREFIX)
    return _images_question_answer(b, num_sem, sem_height, sem_width, question, answer)


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------
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


def fits(samples: list[SampleTokens], shape: RowShape) -> bool:
    """Whether `samples` fit one row: sample slots, semantic slots and semantic image slots."""
    return (len(samples) <= shape.sample_slots and sum(s.num_semantic_tokens for s in samples) <= shape.num_sem
            and sum(s.num_sem_images for s in samples) <= shape.sem_slots)


def pack_row(samples: list[SampleTokens], shape: RowShape) -> dict[str, np.ndarray]:
    """Packs whole samples into one row (fields of PackedBatch without images/GT).

    Sample k occupies geometry sample slot k. Raises ValueError when they do not fit.
    """
    if not fits(samples, shape):
        raise ValueError(f"{len(samples)} samples do not fit a row of {shape}")
    length, lu = shape.length, shape.num_sem
    row = {"token_ids": np.zeros(length, np.int32), "token_type": np.zeros(length, np.int32),
           "positions": np.zeros((3, length), np.int32), "seq_order": np.full(length, PAD_ORDER, np.int32),
           "document_ids": np.zeros(length, np.int32), "split_ids": np.zeros(length, np.int32),
           "split_full": np.zeros(length, bool), "geo_frame": np.full(length, -1, np.int32),
           "labels": np.zeros(length, np.int32), "loss_mask": np.zeros(length, np.float32),
           "sem_token_pos": np.full((shape.sem_slots, shape.sem_tokens_per_image), length, np.int32)}
    cursor, order, split_base, image = 0, 0, 0, 0
    for k, s in enumerate(samples):
        if s.num_frames not in (0, shape.views) or (s.num_frames and s.geo_grid != (shape.height // GEO_PATCH,
                                                                                  shape.width // GEO_PATCH)):
            raise ValueError(f"sample {k} has {s.num_frames} frames of grid {s.geo_grid}; the row expects "
                             f"{shape.views} frames of {shape.height}x{shape.width}")
        n = len(s.token_ids)
        is_geo = s.token_type == TOKEN_DINO
        sem_idx = np.flatnonzero(~is_geo)
        slots = np.empty(n, np.int64)
        slots[sem_idx] = cursor + np.arange(len(sem_idx))
        slots[is_geo] = lu + k * shape.geo_tokens_per_sample + np.arange(int(is_geo.sum()))
        cursor += len(sem_idx)
        row["token_ids"][slots] = np.where(is_geo, 0, s.token_ids)
        row["token_type"][slots] = s.token_type
        row["positions"][:, slots] = s.positions
        row["seq_order"][slots] = order + np.arange(n)
        row["document_ids"][slots] = k + 1
        row["split_ids"][slots] = split_base + s.split
        row["split_full"][slots] = s.split_full
        row["geo_frame"][slots] = s.geo_frame
        row["labels"][slots] = s.labels
        row["loss_mask"][slots] = s.loss_mask
        vit = slots[s.token_type == TOKEN_VIT].reshape(s.num_sem_images, shape.sem_tokens_per_image) if s.num_sem_images else []
        for img_slots in vit:
            row["sem_token_pos"][image] = img_slots
            image += 1
        order += n
        split_base += int(s.split.max(initial=0))
    return row


def row_shape_for(tokens_per_pack: int, views: int, height: int, width: int, *, sem_per_sample: int,
                  sem_height: int, sem_width: int, reserve_per_sample: int) -> RowShape:
    """The bucket's static row shape: as many sample slots as fit with `reserve_per_sample` semantic tokens each.

    S = tokens_per_pack // (geometry tokens + reserve) (at least 1); N = S * sem_per_sample.
    """
    geo = views * (height // GEO_PATCH) * (width // GEO_PATCH)
    slots = max(1, tokens_per_pack // (geo + reserve_per_sample))
    shape = RowShape(tokens_per_pack, slots, views, height, width, slots * sem_per_sample, sem_height, sem_width)
    if shape.num_sem < reserve_per_sample:
        raise ValueError(f"data.tokens_per_pack={tokens_per_pack} cannot hold one sample of {views} frames at "
                         f"{height}x{width} ({geo} geometry tokens + {reserve_per_sample} others); raise tokens_per_pack "
                         "or lower data.max_views / data.image_size")
    return shape
