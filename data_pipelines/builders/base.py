"""What every scene builder shares: the record features, ArrayRecord output, order and split layout.

Builders write ArrayRecord files (random access without TensorFlow) in generation order
(`disable_shuffling`), so record i of a split is the i-th scene the builder yielded: scene index
for synthetic data, sorted scene/row order for converted data. Read them back with
`tfds.data_source("<builder>/<config>", split=..., data_dir=...)` and `records.record_to_scene`.
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import io
import json
import pathlib
from collections.abc import Callable

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from data_pipelines import records
from g2vlm_jax.console import progress

SPLITS = ("train", "validation", "test")


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a dataset built on this machine: there is no pre-computed info to fetch.

    tfds 4.9.10 calls `initialize_from_bucket` whenever a builder is constructed before its data is
    prepared; with GCS disabled it finds nothing but first makes a `tempfile.mkdtemp("tfds")` directory
    that it never removes, one per construction (839 empty /tmp/tmp*tfds after a day of runs and tests).
    """

    def initialize_from_bucket(self) -> None:
        return None


class SceneRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder of `records.scene_features()` records written as ArrayRecord."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 resolves a packaged builder's source file through `importlib_resources`, which
        # it does not declare as a dependency on Python >= 3.9; the plain file path is equivalent.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    CONFIG_CLASS: type = tfds.core.BuilderConfig  # the config type this builder reads its settings from

    @property
    def settings(self):
        """The builder config, checked: manual-data builders have no predefined configs, so every
        build names one (the converters in data_pipelines.convert do)."""
        if not isinstance(self.builder_config, self.CONFIG_CLASS):
            raise ValueError(f"{self.name} needs config={self.CONFIG_CLASS.__name__}(name=...), got "
                             f"{self.builder_config!r}; data_pipelines.convert builds one for you")
        return self.builder_config

    def _features(self) -> tfds.features.FeaturesDict:
        """The record features (scene records; the VQA builder writes `records.vqa_features()`)."""
        return records.scene_features()

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(builder=self, description=(self.__doc__ or "").strip(),
                                features=self._features(), disable_shuffling=True)


class RowError(ValueError):
    """A source row that cannot become a record; `reason` is a short stable string for counting."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class JsonlRowsBuilder(SceneRecordBuilder, skip_registration=True):
    """A builder whose source is `<split>.jsonl` files of rows (or `config.files`), one record per row.

    Subclasses define `row_to_record(row, root, row_id) -> dict`; a row raising RowError (or not
    being JSON) is skipped and counted in `self.skipped` by reason.
    """

    ROW_KIND = "rows"  # shown in the progress bar

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.skipped: collections.Counter = collections.Counter()  # rows skipped in the last build, by reason

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        name = self.CONFIG_CLASS.__name__
        files = self.settings.files or tuple((s, f"{s}.jsonl") for s in SPLITS if (root / f"{s}.jsonl").is_file())
        if not files:
            raise ValueError(f"no rows to convert: give {name}.files or put <split>.jsonl in {root}")
        for split, path in files:
            if split not in SPLITS or not (root / path).is_file():
                raise ValueError(f"{name}.files entry ({split!r}, {path!r}): split must be in {SPLITS} "
                                 f"and the file must exist (relative paths are under {root})")
        return {split: self._generate_examples(root, root / path) for split, path in files}

    def _generate_examples(self, root: pathlib.Path, path: pathlib.Path):
        lines = path.read_text().splitlines()
        for number, line in enumerate(progress(lines, desc=f"{self.ROW_KIND} {path.name}", leave=False)):
            if not line.strip():
                continue
            row_id = f"{path.stem}-{number}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise RowError("bad_json", "a row must be a JSON object")
                record = self.row_to_record(row, root, row_id)
            except json.JSONDecodeError:
                self.skipped["bad_json"] += 1
                continue
            except RowError as e:
                self.skipped[e.reason] += 1
                continue
            yield row_id, record


def find_scene_dirs(root: pathlib.Path, is_scene: Callable[[pathlib.Path], bool], split: str,
                    expected: str) -> dict[str, list[pathlib.Path]]:
    """Scene folders under a source root, by split. Accepted layouts:
        root is itself one scene                  -> {split: [root]}
        root/{train,validation,test}/<scene>/     -> one list per split folder present
        root/<scene>/                             -> {split: [...]}
    `expected` describes a scene folder for the error message."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ValueError(f"source directory {root} does not exist")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} must be one of {SPLITS}")
    if is_scene(root):
        return {split: [root]}
    layout = {s: root / s for s in SPLITS if (root / s).is_dir()} or {split: root}
    found = {s: sorted(p for p in d.iterdir() if p.is_dir() and is_scene(p)) for s, d in layout.items()}
    found = {s: scenes for s, scenes in found.items() if scenes}
    if not found:
        raise ValueError(f"no scene folders under {root}: expected {expected} in {root}, in {root}/<scene>/ "
                         f"or in {root}/<split>/<scene>/ with split in {SPLITS}")
    return found


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | pathlib.Path | None = None) -> dict[str, int]:
    """Builds the dataset (offline) and returns {split: number of records}.

    TFDS's own progress bars are off (ours show each split's records, on a terminal only) and what it
    prints for downloads ("Downloading and preparing dataset Unknown size ...": nothing is downloaded
    here) goes to the log at INFO.
    """
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir)) if manual_dir is not None else None
    with _tfds_quietly():
        builder.download_and_prepare(download_config=config)
    return {name: info.num_examples for name, info in builder.info.splits.items()}


@contextlib.contextmanager
def _tfds_quietly():
    """TFDS without its progress bars, and what it prints (download announcements) logged at INFO."""
    tfds.disable_progress_bar()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        for line in printed.getvalue().splitlines():
            if line.strip():
                logging.info("tfds: %s", line.strip())


class SceneSource:
    """Random-access decoded scenes of one split: `len(src)`, `src[i] -> Scene` (deterministic).
    `src.records[i]` is the raw record, for callers that decode a view subset themselves."""

    def __init__(self, records_source, strict: bool = True):
        self.records, self.strict = records_source, strict

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return records.record_to_scene(self.records[index], strict=self.strict)


def _data_source(name: str, split: str, data_dir, builder_kwargs: dict | None, vqa: bool):
    """tfds.data_source of '<builder>/<config>', checked to hold scene records (vqa=False) or VQA records."""
    try:
        with _tfds_quietly():  # the synthetic datasets are built here on first use
            source = tfds.data_source(name, split=split, data_dir=str(data_dir), builder_kwargs=builder_kwargs)
    except ValueError as e:
        # The reason's first line only: tfds appends its catalogue of public datasets (4,000+ characters).
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"cannot open {name!r} split {split!r} under {data_dir}: {reason} Converted datasets "
                         "(npz_scenes, scannet_scenes, spar_qa, vqa_samples) must be written first with "
                         "data_pipelines.convert (g2vlm convert-data).") from e
    holds_vqa = "roles" in source.dataset_info.features.keys()
    if holds_vqa != vqa:
        what, kind = ("VQA", "'vqa'") if holds_vqa else ("scene", "'recon' or 'recon_qa'")
        raise ValueError(f"{name!r} holds {what} records; read it as a DataSource of kind {kind}")
    return source


def open_scenes(name: str, *, split: str, data_dir: str | pathlib.Path, strict: bool = True,
                builder_kwargs: dict | None = None) -> SceneSource:
    """Opens '<builder>/<config>' (ArrayRecord, no TensorFlow). Registered builders that can build
    offline (the synthetic ones) are built on first use; converted datasets must exist already."""
    return SceneSource(_data_source(name, split, data_dir, builder_kwargs, vqa=False), strict=strict)


class VqaSource:
    """Random-access decoded general-VQA samples of one split: `len(src)`, `src[i] -> records.VQASample`."""

    def __init__(self, records_source):
        self.records = records_source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return records.record_to_vqa(self.records[index])


def open_vqa(name: str, *, split: str, data_dir: str | pathlib.Path) -> VqaSource:
    """Opens a converted VQA dataset ('vqa_samples/<name>', see `data_pipelines.convert.convert_vqa`)."""
    return VqaSource(_data_source(name, split, data_dir, None, vqa=True))
