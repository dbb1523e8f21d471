"""Sequence building (SPEC 1.4): positions, splits, labels of a hand-checked 2-frame recon-then-QA sample;
packing never splits a sample and follows the expert-grouped row layout."""
import numpy as np
import pytest

from data_pipelines import sequence as S
from g2vlm_jax.batch import PAD_ORDER, TOKEN_DINO, TOKEN_TEXT, TOKEN_VIT
from g2vlm_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("sentencepiece:builtin")


def test_chat_layout_is_the_official_one(tok):
    """SPEC 4: the chat template, the frames, the images, the question, `<|im_end|>\n<|im_start|>assistant`,
    then `\n` (the answer's first input, labelled with the answer's first token)."""
    sp = tok.special
    qa = S.recon_qa_sample(tok, 2, 28, 28, 0, 56, 56, "How far?", "2.4")
    text = qa.token_ids[qa.token_type == TOKEN_TEXT]
    question_end = tok.encode("How far?" + S.ASSISTANT_TURN)
    nl = tok.encode(S.ANSWER_START)
    assert len(nl) == 1
    tail = list(text[-(len(question_end) + len(nl) + len(tok.encode("2.4")) + 1):])
    assert tail == question_end + nl + tok.encode("2.4") + [sp.im_end]
    first = int(np.flatnonzero(qa.loss_mask)[0])
    assert qa.token_ids[first] == nl[0] and qa.labels[first] == tok.encode("2.4")[0]
    prompt, ids = tok.encode(S.RECON_PROMPT), list(qa.token_ids[:first])
    assert not any(ids[i:i + len(prompt)] == prompt for i in range(len(ids)))  # no reconstruction prompt in chat


def test_recon_qa_positions_splits_and_labels_hand_written(tok):
    # 2 geometry frames of 28x28 (2x2 patches), one 56x56 semantic image (2x2 merged tokens).
    s = S.recon_qa_sample(tok, 2, 28, 28, 1, 56, 56, "Which is closer?", "B")
    p = len(tok.encode(S.SYSTEM_PREFIX))  # first image start marker: the chat layout has no reconstruction prompt
    # Rows: (token type, t, h, w, split offset, full, geo_frame) for the image part, written out by hand.
    expected = [
        (TOKEN_TEXT, p, p, p, 0, True, 0),            # <|vision_start|> of frame 0
        (TOKEN_DINO, p + 1, p + 1, p + 1, 0, True, 0),  # patch (0, 0)
        (TOKEN_DINO, p + 1, p + 1, p + 2, 0, True, 0),  # patch (0, 1)
        (TOKEN_DINO, p + 1, p + 2, p + 1, 0, True, 0),  # patch (1, 0)
        (TOKEN_DINO, p + 1, p + 2, p + 2, 0, True, 0),  # patch (1, 1)
        (TOKEN_TEXT, p + 3, p + 3, p + 3, 0, True, 0),  # <|vision_end|> (p += max(2, 2))
        (TOKEN_TEXT, p + 4, p + 4, p + 4, 1, True, 1),  # frame 1
        (TOKEN_DINO, p + 5, p + 5, p + 5, 1, True, 1),
        (TOKEN_DINO, p + 5, p + 5, p + 6, 1, True, 1),
        (TOKEN_DINO, p + 5, p + 6, p + 5, 1, True, 1),
        (TOKEN_DINO, p + 5, p + 6, p + 6, 1, True, 1),
        (TOKEN_TEXT, p + 7, p + 7, p + 7, 1, True, 1),
        (TOKEN_TEXT, p + 8, p + 8, p + 8, 2, True, -1),  # semantic image: start marker
        (TOKEN_VIT, p + 9, p + 9, p + 9, 2, True, -1),
        (TOKEN_VIT, p + 9, p + 9, p + 10, 2, True, -1),
        (TOKEN_VIT, p + 9, p + 10, p + 9, 2, True, -1),
        (TOKEN_VIT, p + 9, p + 10, p + 10, 2, True, -1),
        (TOKEN_TEXT, p + 11, p + 11, p + 11, 2, True, -1),
        (TOKEN_TEXT, p + 12, p + 12, p + 12, 3, False, -1),  # first question token (causal)
    ]
    first_image_split = s.split[p]
    for k, (typ, t, h, w, split_off, full, frame) in enumerate(expected):
        i = p + k
        assert (s.token_type[i], *s.positions[:, i]) == (typ, t, h, w), k
        assert (s.split[i] - first_image_split, s.split_full[i], s.geo_frame[i]) == (split_off, full, frame), k
    # Text before the images: plain (p, p, p) positions, one causal split per item.
    np.testing.assert_array_equal(s.positions[:, :p], np.tile(np.arange(p), (3, 1)))
    assert not s.split_full[:p].any()
    # Labels: "\n"+answer tokens predict the next token, the last predicts <|im_end|>; the extra
    # <|im_end|> input that follows is not a loss position.
    answer = tok.encode("\nB")
    loss_pos = np.flatnonzero(s.loss_mask)
    assert len(loss_pos) == len(answer)
    np.testing.assert_array_equal(s.token_ids[loss_pos], answer)
    np.testing.assert_array_equal(s.labels[loss_pos], answer[1:] + [tok.special.im_end])
    assert s.token_ids[-1] == tok.special.im_end and s.loss_mask[-1] == 0
    # Positions keep increasing by one per text token after the images.
    assert s.positions[0, -1] == s.positions[0, loss_pos[-1]] + 1


def test_pack_row_expert_grouped_layout(tok):
    shape = S.row_shape_for(160, 2, 28, 28, sem_per_sample=0, sem_height=28, sem_width=28, reserve_per_sample=20)
    samples = [S.recon_sample(tok, 2, 28, 28) for _ in range(shape.sample_slots)]
    row = S.pack_row(samples, shape)
    lu, per = shape.num_sem, shape.geo_tokens_per_sample
    assert shape.sample_slots >= 2 and shape.num_geo == shape.sample_slots * per
    # Geometry slots: sample s, frame v, patch (i, j) at lu + ((s * V + v) * gh + i) * gw + j.
    assert (row["token_type"][lu:] == TOKEN_DINO).all() and (row["token_type"][:lu] != TOKEN_DINO).all()
    for s in range(shape.sample_slots):
        block = slice(lu + s * per, lu + (s + 1) * per)
        assert (row["document_ids"][block] == s + 1).all()
        np.testing.assert_array_equal(row["geo_frame"][block], np.repeat([0, 1], 4))
    # Reading order is kept in seq_order: each sample's tokens are consecutive, samples in order.
    for doc in range(1, shape.sample_slots + 1):
        order = np.sort(row["seq_order"][row["document_ids"] == doc])
        np.testing.assert_array_equal(order, np.arange(order[0], order[0] + len(samples[0].token_ids)))
    pad = row["document_ids"] == 0
    assert (row["seq_order"][pad] == PAD_ORDER).all() and (row["token_type"][pad] == 0).all()
    # Split ids are unique per row: no two samples share one.
    splits = {d: set(row["split_ids"][row["document_ids"] == d]) for d in range(1, shape.sample_slots + 1)}
    assert all(not (splits[a] & splits[b]) for a in splits for b in splits if a < b)


def test_packing_never_splits_a_sample(tok):
    shape = S.row_shape_for(96, 2, 28, 28, sem_per_sample=0, sem_height=28, sem_width=28, reserve_per_sample=20)
    too_many = [S.recon_sample(tok, 2, 28, 28) for _ in range(shape.sample_slots + 1)]
    assert not S.fits(too_many, shape)
    with pytest.raises(ValueError, match="do not fit"):
        S.pack_row(too_many, shape)
    with pytest.raises(ValueError, match="tokens_per_pack"):
        S.row_shape_for(10, 2, 28, 28, sem_per_sample=0, sem_height=28, sem_width=28, reserve_per_sample=20)
    wrong_views = S.recon_sample(tok, 3, 28, 28)
    with pytest.raises(ValueError, match="expects 2 frames"):
        S.pack_row([wrong_views], shape)
