"""Grain pipeline: step-indexed, per-process packed batches from a mixture of scene and VQA sources.

Determinism is by construction: the batch of global step t on JAX process p is a pure function of
(seed, t, p) — `BatchMaker(t)`. The iterator state is just the next step (plus skip counters), so a
resume yields exactly the batches an uninterrupted run yields, with any number of workers.

Per step:
  1. draw V (rounded up to a view bucket) and the aspect bucket once: every pack of the global
     batch shares them, so a step has one static shape and a run compiles one program per bucket;
  2. for each of this process's packs j (global pack ids p*B_local .. (p+1)*B_local-1, disjoint
     across processes) and each sample slot s: choose a source by mixture weight, take the next
     index of that source's per-epoch permutation (slot counter (t * P + j) * S_max + s), decode the
     record, sample views (augmented for training), build the token sequence;
  3. pack the samples into the row (`sequence.pack_row`) and stack rows into numpy batch fields.

Sample layouts by `DataSource.kind` (SPEC 1.4):
  recon     scene records: the reconstruction prompt and V geometry frames (VG loss);
  recon_qa  scene records with QA pairs: chat, geometry frames, the question's marked semantic image,
            question, answer (CE);
  vqa       general VQA records (`vqa_samples`, `g2vlm convert-data vqa`): chat with the sample's N
            images through the ViT, every answer trained with CE. No geometry: the sample's slot keeps
            sample_valid False (no VG loss). Its images take N of the pack's semantic image slots (one
            per sample slot); a sample with more images than a pack has slots is skipped.

Bad records (corrupt images, NaN/empty depth, singular poses, mismatched view sizes), over-long
text ('text_too_long', over data.max_text_tokens) and too many images ('too_many_images') leave
their slot empty and are counted per reason (logged when a reason first appears, then every
`log_every` steps); with `DataConfig.strict` they raise, naming the record.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import pathlib

import grain
import numpy as np
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from data_pipelines import sampling, sequence
from data_pipelines.records import BadRecordError
from g2vlm_jax.batch import GEO_PATCH, IMAGE_FIELDS, VIT_MERGED_PATCH, PackedBatch, empty_row
from g2vlm_jax.config import DataConfig, DataSource
from g2vlm_jax.tokenizer import load_tokenizer

SYNTHETIC_BUILDERS = {"synthetic": "synthetic_scenes", "synthetic_qa": "synthetic_spatial_qa"}
PREFETCH_STEPS = 2  # batches built ahead (in threads) per process, and per Grain worker process
CHAT_OVERHEAD_TOKENS = 48  # chat-template text around a QA sample (system prefix, assistant turn, ...)


def builder_name(source: DataSource, data: DataConfig) -> tuple[str, dict]:
    """Maps a DataSource to ('<tfds builder>/<config>', builder kwargs).

    The synthetic sources get a custom config sized for the experiment (enough views for
    `max_views`, frames a little larger than `image_size` so crops and jitter have room).
    """
    if source.name in SYNTHETIC_BUILDERS:
        from data_pipelines.builders.synthetic import SyntheticConfig
        from data_pipelines.synthetic.spatial_qa import QAConfig

        h, w = data.image_size
        scale = 1.25
        n = source.synthetic_scenes
        name = f"h{int(h * scale)}w{int(w * scale)}v{max(data.max_views, 6)}n{n[0]}-{n[1]}-{n[2]}"
        qa = QAConfig(tasks=source.qa_tasks or QAConfig.tasks, per_task=source.qa_per_task,
                      fixed_order=source.qa_fixed_order)
        if qa != QAConfig():  # another question set is another dataset (the name is its cache key)
            name += f"q{'-'.join(qa.tasks)}x{qa.per_task}" + "".join(f"f{t}" for t in qa.fixed_order)
        cfg = SyntheticConfig(name=name, height=int(h * scale), width=int(w * scale), num_views=max(data.max_views, 6),
                              num_scenes=n, qa=qa)
        return SYNTHETIC_BUILDERS[source.name], {"config": cfg}
    return source.name, {}


def open_source(source: DataSource, data: DataConfig, split: str, workdir: pathlib.Path):
    """A random-access source for one mixture entry: a SceneSource (built on first use for synthetic
    data), or a VqaSource for kind 'vqa' (a converted `vqa_samples/<name>` dataset)."""
    from data_pipelines.builders.base import open_scenes, open_vqa

    name, kwargs = builder_name(source, data)
    data_dir = source.data_dir or str(workdir / "data")
    if source.kind == "vqa":
        return open_vqa(name, split=split, data_dir=data_dir)
    # Lenient decoding repairs NaN/negative depth pixels (set to "no value"); strict raises instead.
    return open_scenes(name, split=split, data_dir=data_dir, strict=data.strict, builder_kwargs=kwargs or None)


@dataclasses.dataclass(frozen=True)
class Bucket:
    views: int
    height: int
    width: int


def view_bucket(data: DataConfig, views: int) -> int:
    """The view bucket a draw of `views` frames is rounded up to."""
    return next(b for b in data.view_buckets if b >= views)


def bucket_heights(data: DataConfig) -> list[int]:
    """Frame heights of the aspect levels (width is `image_size[1]`); one height without an aspect range."""
    lo, hi = data.aspect_range
    if hi <= lo:
        return [data.image_size[0]]
    width = data.image_size[1]
    return [max(int(round(width * a / GEO_PATCH)) * GEO_PATCH, GEO_PATCH) for a in np.linspace(lo, hi, data.aspect_buckets)]


def draw_bucket(data: DataConfig, rng: np.random.Generator) -> Bucket:
    """V uniform in [min_views, max_views] rounded up to a view bucket; aspect H/W from a few levels."""
    views = view_bucket(data, int(rng.integers(data.min_views, data.max_views + 1)))
    heights = bucket_heights(data)
    return Bucket(views, heights[int(rng.integers(len(heights)))], data.image_size[1])


def train_buckets(data: DataConfig) -> list[Bucket]:
    """Every bucket `draw_bucket` can draw (one compiled train step each), views x heights."""
    views = sorted({view_bucket(data, v) for v in range(data.min_views, data.max_views + 1)})
    return [Bucket(v, h, data.image_size[1]) for v in views for h in sorted(set(bucket_heights(data)))]


def eval_bucket(data: DataConfig) -> Bucket:
    """The bucket of held-out batches and questions: the largest view bucket, frames at `image_size`."""
    return Bucket(max(b for b in data.view_buckets if b <= data.max_views), *data.image_size)


@functools.lru_cache(maxsize=8)
def _marker_font(size: int) -> ImageFont.FreeTypeFont:
    """The label font of `draw_markers`, loaded once per size (it is drawn for every marked QA sample)."""
    return ImageFont.load_default(size=size)


# How a marker is drawn: (colour, filled). The synthetic questions' two markers differ in colour *and* shape,
# X a red ring, Y a filled blue disc: drawn as two red rings (or red and magenta) the tiny model could not tell
# which marked point was which ("which marked point is lower, X or Y?": 0.57-0.62 against 0.545 for the best
# constant; 0.73 with these markers, issue #18). SPAR-style labels name their colour ('red', 'blue', ... from
# the official '<colour>_point' metadata): those are drawn as filled dots of that colour; any other label as X.
MARKER_STYLES = {"X": ((255, 0, 0), False), "Y": ((0, 0, 255), True)}
NAMED_COLOURS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
                 "orange": (255, 128, 0), "purple": (128, 0, 200), "magenta": (255, 0, 255), "pink": (255, 105, 180),
                 "cyan": (0, 255, 255), "black": (0, 0, 0), "white": (255, 255, 255)}


def marker_style(label: str) -> tuple[tuple[int, int, int], bool]:
    """(RGB colour, filled) of a marker labelled `label` (see MARKER_STYLES)."""
    if label in MARKER_STYLES:
        return MARKER_STYLES[label]
    colour = NAMED_COLOURS.get(str(label).lower())
    return (colour, True) if colour is not None else MARKER_STYLES["X"]


def draw_markers(image: np.ndarray, markers, view: int) -> np.ndarray:
    """The question's point markers of `view` drawn on an image [H, W, 3] uint8: a ring or filled disc of
    radius H/14 (4 px at the 56-px training size: it must cover a good part of a 14-px patch to be seen) in
    the label's style (`marker_style`), and the label beside it in the same colour."""
    mine = [m for m in markers if m[0] == view]
    if not mine:
        return image
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    r = max(2, round(image.shape[0] / 14))
    font = _marker_font(max(8, 2 * r))
    for _, u, v, label in mine:
        colour, filled = marker_style(label)
        draw.ellipse([u - r, v - r, u + r, v + r], fill=colour if filled else None, outline=colour, width=max(1, r // 2))
        draw.text((u + r, v - 3 * r), str(label), fill=colour, font=font)
    return np.asarray(pil)


def qa_inputs(scene, qa, bucket: Bucket, sem_size: tuple[int, int], rng: np.random.Generator, *,
              augment: bool) -> tuple[sampling.ViewSample, np.ndarray]:
    """The model inputs of one question: geometry views and the marked semantic image.

    The question's markers are drawn on its source views first, so the geometry frames and the
    semantic image show the same marked pixels, as a real marked QA image (SPAR-style) reaches both
    encoders. The question's own views come first (in their order), then other sampled frames. The
    semantic image is the question's first view resized to `sem_size` (H, W), as float32[H, W, 3] in
    [0, 1]. Shared by training batches and the spatial-QA evaluator.
    """
    if qa.markers:
        images = scene.images.copy()
        for view in {m[0] for m in qa.markers}:
            images[view] = draw_markers(images[view], qa.markers, view)
        scene = dataclasses.replace(scene, images=images)
    frames = list(qa.views[:bucket.views])
    rest = [f for f in sampling.sample_frames(scene.num_views, bucket.views + len(frames), rng) if f not in frames]
    frames = (frames + rest + frames * bucket.views)[:bucket.views]
    views = sampling.sample_views(scene, bucket.views, (bucket.height, bucket.width), rng, augment=augment,
                                  frames=frames)
    src_view = qa.views[0] if qa.views else frames[0]
    sh, sw = sem_size
    img = np.asarray(Image.fromarray(scene.images[src_view]).resize((sw, sh), Image.BICUBIC))
    return views, img.astype(np.float32) / 255.0


class BatchMaker:
    """Builds the numpy batch of one global step for one process: `maker(step) -> (fields, skips)`."""

    def __init__(self, data: DataConfig, sources: list[tuple[DataSource, object]], *, process_index: int,
                 process_count: int, augment: bool, seed: int, fixed_views: int | None = None):
        if data.packs_per_step % process_count:
            raise ValueError(f"data.packs_per_step={data.packs_per_step} is not divisible by the {process_count} "
                             "JAX processes; make it a multiple of the process count")
        self.data, self.sources = data, sources
        self.process_index, self.process_count = process_index, process_count
        self.local_packs = data.packs_per_step // process_count
        self.augment, self.seed, self.fixed_views = augment, seed, fixed_views
        self.weights = np.array([s.weight for s, _ in sources], np.float64)
        self.weights /= self.weights.sum()
        self.sem_per_sample = 1 if any(s.kind != "recon" for s, _ in sources) else 0
        self.max_slots = max(self.row_shape(Bucket(v, data.image_size[0], data.image_size[1])).sample_slots
                             for v in data.view_buckets)
        self._tokenizer = None
        self._perm_cache: dict = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # loaded lazily: workers unpickle the maker without it
            self._tokenizer = load_tokenizer(self.data.tokenizer)
        return self._tokenizer

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"], state["_perm_cache"] = None, {}
        return state

    def row_shape(self, bucket: Bucket) -> sequence.RowShape:
        d = self.data
        reserve = 2 * bucket.views + 8
        if self.sem_per_sample:
            ts = (d.vit_image_size[0] // VIT_MERGED_PATCH) * (d.vit_image_size[1] // VIT_MERGED_PATCH)
            reserve += d.max_text_tokens + CHAT_OVERHEAD_TOKENS + self.sem_per_sample * (ts + 2)
        return sequence.row_shape_for(d.tokens_per_pack, bucket.views, bucket.height, bucket.width,
                                      sem_per_sample=self.sem_per_sample, sem_height=d.vit_image_size[0],
                                      sem_width=d.vit_image_size[1], reserve_per_sample=reserve)

    def _index(self, source_i: int, counter: int) -> int:
        """The `counter`-th element of the per-epoch permutation of source `source_i`."""
        n = len(self.sources[source_i][1])
        epoch, offset = divmod(counter, n)
        key = (source_i, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([self.seed, source_i, epoch]).permutation(n)
        return int(self._perm_cache[key][offset])

    def _too_long(self, where: str, texts, skips: collections.Counter) -> bool:
        """Whether the texts exceed data.max_text_tokens: counted as 'text_too_long', or raised (strict)."""
        n = sum(len(self.tokenizer.encode(t)) for t in texts)
        if n <= self.data.max_text_tokens:
            return False
        if self.data.strict:
            raise ValueError(f"{where}: its text has {n} tokens, more than data.max_text_tokens="
                             f"{self.data.max_text_tokens}; raise the limit or drop the record")
        skips["text_too_long"] += 1
        return True

    def _sample(self, source_i: int, index: int, bucket: Bucket, shape: sequence.RowShape, rng: np.random.Generator,
                skips: collections.Counter):
        """(SampleTokens, ViewSample or None, [semantic images float32[Hs, Ws, 3]]) of one record, or
        None when it is skipped."""
        source, items = self.sources[source_i]
        try:
            item = items[index]
        except BadRecordError as e:
            if self.data.strict:
                raise BadRecordError(e.reason, f"{source.name}[{index}]") from e
            skips[e.reason] += 1
            return None
        tok, d = self.tokenizer, self.data
        if source.kind == "vqa":
            return self._vqa_sample(f"{source.name}[{index}] ({item.sample_id})", item, shape, skips)
        if source.kind == "recon":
            views = sampling.sample_views(item, bucket.views, (bucket.height, bucket.width), rng, augment=self.augment)
            return sequence.recon_sample(tok, bucket.views, bucket.height, bucket.width), views, []
        if not item.qa:
            skips["no_qa"] += 1
            return None
        qa = item.qa[int(rng.integers(len(item.qa)))]
        if self._too_long(f"{source.name}[{index}] ({item.scene_id})", (qa.question, qa.answer), skips):
            return None
        views, img = qa_inputs(item, qa, bucket, d.vit_image_size, rng, augment=self.augment)
        sh, sw = d.vit_image_size
        tokens = sequence.recon_qa_sample(tok, bucket.views, bucket.height, bucket.width, 1, sh, sw, qa.question,
                                          qa.answer)
        return tokens, views, [img]

    def _vqa_sample(self, where: str, sample, shape: sequence.RowShape, skips: collections.Counter):
        """A general VQA sample: no geometry, its images resized to data.vit_image_size for the ViT."""
        if self._too_long(where, [t for _, t in sample.turns], skips):
            return None
        if len(sample.images) > shape.sem_slots:
            if self.data.strict:
                raise ValueError(f"{where}: {len(sample.images)} images, more than the {shape.sem_slots} semantic "
                                 "image slots of a pack; raise data.tokens_per_pack or drop the record")
            skips["too_many_images"] += 1
            return None
        sh, sw = self.data.vit_image_size
        sems = [np.asarray(Image.fromarray(im).resize((sw, sh), Image.BICUBIC), np.float32) / 255.0
                for im in sample.images]
        tokens = sequence.vqa_conversation_sample(self.tokenizer, sample.turns, len(sems), sh, sw)
        return tokens, None, sems

    def __call__(self, step: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        d = self.data
        step_rng = np.random.default_rng([self.seed, step])
        bucket = draw_bucket(d, step_rng)
        if self.fixed_views:
            bucket = Bucket(self.fixed_views, d.image_size[0], d.image_size[1])
        shape = self.row_shape(bucket)
        skips: collections.Counter = collections.Counter()
        rows = [self._pack(step, self.process_index * self.local_packs + r, bucket, shape, skips)
                for r in range(self.local_packs)]
        fields = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
        return fields, dict(skips)

    def _pack(self, step: int, pack_id: int, bucket: Bucket, shape: sequence.RowShape, skips) -> dict:
        s_slots = shape.sample_slots
        out = empty_row(shape, IMAGE_FIELDS)
        samples = []
        for s in range(s_slots):
            rng = np.random.default_rng([self.seed, step, pack_id, s])
            source_i = int(rng.choice(len(self.sources), p=self.weights))
            index = self._index(source_i, (step * self.data.packs_per_step + pack_id) * self.max_slots + s)
            got = self._sample(source_i, index, bucket, shape, rng, skips)
            if got is None:
                continue
            tokens, views, sems = got
            if not sequence.fits(samples + [tokens], shape):
                skips["pack_full"] += 1
                continue
            k, n = len(samples), sum(t.num_sem_images for t in samples)  # sample slot, first semantic image slot
            samples.append(tokens)
            if views is not None:  # general VQA samples have no geometry: their slot stays invalid for the VG loss
                out["geo_images"][k], out["gt_world_points"][k], out["gt_valid"][k] = views.images, views.world_points, views.valid
                out["gt_poses"][k], out["gt_intrinsics"][k] = views.c2w, views.intrinsics
                out["sample_valid"][k], out["normal_loss_enabled"][k] = True, views.normal_loss
            for i, sem in enumerate(sems):
                out["sem_images"][n + i], out["sem_image_valid"][n + i] = sem, True
        out.update(sequence.pack_row(samples, shape))
        return out


def to_packed_batch(fields: dict[str, np.ndarray]) -> PackedBatch:
    return PackedBatch(**fields)


class BatchIterator:
    """Iterates PackedBatches (numpy) of consecutive steps; state = next step + skip counters."""

    def __init__(self, maker: BatchMaker, *, start_step: int = 0, num_workers: int = 0, log_every: int = 100):
        self.maker, self.num_workers, self.log_every = maker, num_workers, log_every
        self.skips: collections.Counter = collections.Counter()
        self._start(start_step)

    def _start(self, step: int) -> None:
        self.step = step
        # Grain's default read options (16 threads, 500 elements ahead) would build and hold hundreds of
        # whole batches; a few steps ahead are enough to hide the batch building behind a train step.
        options = grain.ReadOptions(num_threads=PREFETCH_STEPS, prefetch_buffer_size=PREFETCH_STEPS)
        ds = grain.MapDataset.range(step, 2**31 - 1).map(self.maker).to_iter_dataset(options)
        if self.num_workers:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> PackedBatch:
        fields, skips = next(self._it)
        new_reasons = sorted(set(skips) - set(self.skips))
        self.skips.update(skips)
        self.step += 1
        if new_reasons:
            logging.warning("data: step %d skipped records for a new reason %s; so far %s", self.step - 1,
                            new_reasons, dict(self.skips))
        elif skips and self.step % self.log_every == 0:
            logging.info("data: skipped records so far %s", dict(self.skips))
        return to_packed_batch(fields)

    def skip_counts(self) -> dict[str, int]:
        return dict(self.skips)

    def get_state(self) -> dict:
        return {"step": self.step, "skips": dict(self.skips)}

    def set_state(self, state: dict) -> None:
        self.skips = collections.Counter(state.get("skips", {}))
        self._start(int(state["step"]))


def make_train_iterator(data: DataConfig, workdir: pathlib.Path, *, seed: int, process_index: int = 0,
                        process_count: int = 1) -> BatchIterator:
    """Training batches of this process for steps 0, 1, ... (augmented, mixture of `data.sources`)."""
    sources = [(s, open_source(s, data, "train", workdir)) for s in data.sources]
    maker = BatchMaker(data, sources, process_index=process_index, process_count=process_count,
                       augment=data.augment, seed=seed)
    return BatchIterator(maker, num_workers=data.num_workers)


def make_eval_batches(data: DataConfig, workdir: pathlib.Path, num_batches: int, *, process_index: int = 0,
                      process_count: int = 1) -> list[PackedBatch]:
    """`num_batches` deterministic held-out batches (no augmentation, the largest view bucket)."""
    sources = [(s, open_source(s, data, data.eval_split, workdir)) for s in data.eval_sources]
    maker = BatchMaker(data, sources, process_index=process_index, process_count=process_count, augment=False,
                       seed=10_000 + data.seed, fixed_views=eval_bucket(data).views)
    return [to_packed_batch(maker(step)[0]) for step in range(num_batches)]
