"""General VQA: jsonl rows + image files written here, converted with `g2vlm convert-data vqa`, read
back exactly, and packed by the pipeline (ViT slots, no geometry, CE on every answer only)."""
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import convert, pipeline, sequence
from data_pipelines.builders import open_scenes, open_vqa
from data_pipelines.synthetic import RenderConfig, render_scene
from g2vlm_jax import config as C
from g2vlm_jax.batch import TOKEN_DINO, TOKEN_TEXT, TOKEN_VIT, check_batch
from g2vlm_jax.tokenizer import load_tokenizer

SEM = (56, 56)  # semantic image size: 2 x 2 merged ViT tokens


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_source(root):
    """Image files and a jsonl of 3 good rows (LLaVA 2-image 2-round, question/answer with choices,
    3 images) and 5 bad ones. Returns the good rows' (id, images, turns, answer_type, choices)."""
    (root / "img").mkdir(parents=True)
    images = {"a.png": _image(0, 10, 14), "b.png": _image(1, 7, 9), "c.jpg": _image(2, 16, 12)}
    for name, im in images.items():
        Image.fromarray(im).save(root / "img" / name, quality=90)
    (root / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [
        {"id": "llava-0", "image": ["img/a.png", "img/b.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat differs?"}, {"from": "gpt", "value": "The size."},
            {"from": "human", "value": "Which is wider?"}, {"from": "gpt", "value": "The first."}]},
        {"id": "qa-1", "images": "img/c.jpg", "question": "What colour dominates?", "system": "Answer briefly.",
         "choices": ["A. red", "B. green"], "answer": "A"},
        {"id": "three", "images": ["img/a.png", "img/b.png", "img/c.jpg"], "question": "Same room?", "answer": "no"},
        {"id": "no-answer", "images": ["img/a.png"], "question": "?"},
        {"id": "gpt-first", "image": "img/a.png", "conversations": [{"from": "gpt", "value": "hi"}]},
        {"id": "no-image", "question": "q", "answer": "a"},
        {"id": "broken", "image": "img/broken.png", "question": "q", "answer": "a"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
    decoded = {k: np.asarray(Image.open(root / "img" / k).convert("RGB")) for k in images}  # JPEG: as decoded
    return {
        "llava-0": ((decoded["a.png"], decoded["b.png"]),
                    (("user", "What differs?"), ("assistant", "The size."), ("user", "Which is wider?"),
                     ("assistant", "The first.")), "", ()),
        "qa-1": ((decoded["c.jpg"],), (("system", "Answer briefly."), ("user", "What colour dominates?\nA. red\nB. green"),
                                       ("assistant", "A")), "choice", ("A. red", "B. green")),
        "three": (tuple(decoded[k] for k in ("a.png", "b.png", "c.jpg")),
                  (("user", "Same room?"), ("assistant", "no")), "", ()),
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    expected = _write_source(root / "src")
    result = convert.main(["vqa", str(root / "src" / "rows.jsonl"), str(root / "out"), "--name", "tiny",
                           "--dataset", "toy_vqa"])
    return root, expected, result


def test_convert_and_read_back_exactly(converted):
    root, expected, result = converted
    assert result.dataset == "vqa_samples/tiny" and result.splits == {"train": 3}
    assert result.skipped == {"missing_field": 1, "bad_roles": 1, "no_images": 1, "corrupt_image": 1, "bad_json": 1}
    source = open_vqa(result.dataset, split="train", data_dir=root / "out")
    assert len(source) == 3
    for i, (sample_id, (images, turns, answer_type, choices)) in enumerate(expected.items()):
        got = source[i]  # records keep the row order
        assert (got.sample_id, got.dataset, got.turns, got.answer_type, got.choices) == \
            (sample_id, "toy_vqa", turns, answer_type, choices)
        assert len(got.images) == len(images)
        for a, b in zip(got.images, images):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="holds VQA records"):
        open_scenes(result.dataset, split="train", data_dir=root / "out")
    with pytest.raises(FileNotFoundError):  # a wrong image root is a setup error, not a bad row
        convert.convert_vqa(root / "src" / "rows.jsonl", root / "out2", image_root=root)


def _vqa_data(out_dir, strict=False) -> C.DataConfig:
    source = C.DataSource(name="vqa_samples/tiny", kind="vqa", data_dir=str(out_dir))
    # One row = 2 sample slots of 2 frames at 28x28 (8 geometry tokens each) and 2 semantic image slots.
    return C.DataConfig(sources=(source,), image_size=(28, 28), vit_image_size=SEM, view_buckets=(2,), min_views=2,
                        max_views=2, tokens_per_pack=300, packs_per_step=2, max_text_tokens=64,
                        tokenizer="sentencepiece:builtin", strict=strict)


def _document(batch, b, doc):
    """Reading-order token ids, types, labels and loss mask of document `doc` of row b."""
    slots = np.flatnonzero(batch.document_ids[b] == doc)
    slots = slots[np.argsort(batch.seq_order[b, slots])]
    return (batch.token_ids[b, slots], batch.token_type[b, slots], batch.labels[b, slots], batch.loss_mask[b, slots])


def test_packed_vqa_batches_use_vit_slots_and_train_only_answers(converted, tmp_path):
    root, expected, _ = converted
    tok = load_tokenizer("sentencepiece:builtin")
    want = {k: sequence.vqa_conversation_sample(tok, turns, len(images), *SEM) for k, (images, turns, _, _) in
            expected.items() if k != "three"}
    it = pipeline.make_train_iterator(_vqa_data(root / "out"), tmp_path, seed=0)
    packed = 0
    for _ in range(3):
        batch = next(it)
        check_batch(batch)
        assert batch.sem_images.shape[1:] == (2, *SEM, 3) and not batch.sample_valid.any()
        assert not (batch.token_type == TOKEN_DINO).any()  # no geometry at all
        for b in range(batch.token_ids.shape[0]):
            image = 0
            for doc in range(1, int(batch.document_ids[b].max()) + 1):
                ids, types, labels, loss = _document(batch, b, doc)
                name = next(k for k, s in want.items() if len(s.token_ids) == len(ids)
                            and np.array_equal(np.where(s.token_type == TOKEN_TEXT, s.token_ids, 0), ids))
                s = want[name]
                np.testing.assert_array_equal(types, s.token_type)
                np.testing.assert_array_equal(labels, s.labels)
                np.testing.assert_array_equal(loss, s.loss_mask)
                answers = [t for r, t in expected[name][1] if r == "assistant"]
                assert ids[loss > 0].tolist() == sum((tok.encode("\n" + a) for a in answers), [])
                assert int((types == TOKEN_VIT).sum()) == 4 * len(expected[name][0])
                for im in expected[name][0]:  # its images, resized, in the next semantic image slots
                    sized = np.asarray(Image.fromarray(im).resize(SEM[::-1], Image.BICUBIC), np.float32) / 255
                    np.testing.assert_allclose(batch.sem_images[b, image], sized, atol=1e-6)
                    assert batch.sem_image_valid[b, image]
                    image += 1
                packed += 1
            assert batch.sem_image_valid[b].sum() == image
    assert packed >= 3
    skips = it.skip_counts()
    assert skips["too_many_images"] >= 1 and set(skips) <= {"too_many_images", "pack_full"}
    strict = _vqa_data(root / "out", strict=True)
    maker = pipeline.BatchMaker(strict, [(strict.sources[0], open_vqa("vqa_samples/tiny", split="train",
                                                                       data_dir=root / "out"))],
                                process_index=0, process_count=1, augment=False, seed=0)
    with pytest.raises(ValueError, match=r"vqa_samples/tiny\[2\] \(three\): 3 images"):
        maker(0)  # step 0 draws all 3 records


def test_mixture_of_reconstruction_and_vqa_marks_only_geometry_slots_valid(converted):
    root, _, _ = converted
    data = C.DataConfig(sources=(C.DataSource(), C.DataSource(name="vqa_samples/tiny", kind="vqa")),
                        image_size=(28, 28), vit_image_size=SEM, view_buckets=(2,), min_views=2, max_views=2,
                        tokens_per_pack=300, packs_per_step=4, max_text_tokens=64, augment=False)
    scenes = [render_scene("train", i, RenderConfig(height=35, width=35, num_views=3)).scene for i in range(4)]
    vqa = open_vqa("vqa_samples/tiny", split="train", data_dir=root / "out")
    maker = pipeline.BatchMaker(data, [(data.sources[0], scenes), (data.sources[1], vqa)], process_index=0,
                                process_count=1, augment=False, seed=1)
    kinds = set()
    for step in range(3):
        fields, _ = maker(step)
        for b in range(fields["token_ids"].shape[0]):
            for doc in range(1, int(fields["document_ids"][b].max()) + 1):
                geo = bool(((fields["document_ids"][b] == doc) & (fields["token_type"][b] == TOKEN_DINO)).any())
                vit = bool(((fields["document_ids"][b] == doc) & (fields["token_type"][b] == TOKEN_VIT)).any())
                assert geo != vit and fields["sample_valid"][b, doc - 1] == geo  # document k sits in slot k - 1
                assert (fields["gt_valid"][b, doc - 1].any()) == geo
                kinds.add("recon" if geo else "vqa")
    assert kinds == {"recon", "vqa"}
