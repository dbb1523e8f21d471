"""Tokenizer backends: the built-in sentencepiece model (reproducible) and Qwen2 BPE from tokenizer.json."""
import json
import string

import pytest

from g2vlm_jax import tokenizer as T
from tools import train_tokenizer


def test_builtin_round_trip_and_specials():
    tok = T.load_tokenizer("sentencepiece:builtin")
    text = "<|im_start|>user\nHow far is the red box? Answer with a number in metres.<|im_end|>\n2.35"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 512
    sp = tok.special
    assert len({sp.im_start, sp.im_end, sp.vision_start, sp.vision_end}) == 4
    assert tok.encode("<|vision_start|>") == [sp.vision_start]


def test_builtin_numbers_are_digit_tokens():
    """Numbers are spelt one digit per token, as in Qwen2's vocabulary. A BPE trained on the synthetic answers
    otherwise learns frequent answers as whole tokens ('2.84' one token, '3.15' three), and a numeric answer
    becomes a choice among hundreds of unrelated classes instead of digits the model can learn one by one."""
    tok = T.load_tokenizer("sentencepiece:builtin")
    for number in ("2.84", "3.15", "1.07", "12", "0.5"):
        assert [tok.decode([i]) for i in tok.encode(number)] == list(number), number


def test_builtin_encodes_every_printable_ascii_character():
    """A question typed to `g2vlm chat` on a tiny model keeps every character: none becomes <unk> (the
    synthetic corpus alone lacked q, z, E-G, J-V, Z, quotes and brackets)."""
    tok = T.load_tokenizer("sentencepiece:builtin")
    unk = tok.encode("\u2603")  # a character outside the corpus: the <unk> id
    question = 'Is the TV [#3] left of the "quiz" sofa? {Yes|No} @E-F-G: 50% ~ $10 & <5> ^_^ `x` \\'
    assert tok.decode(tok.encode(question)) == question
    for char in string.printable.strip():
        assert tok.decode(tok.encode(char)) == char and unk[0] not in tok.encode(char), char


def test_retraining_reproduces_the_builtin_model(tmp_path):
    out = train_tokenizer.train(tmp_path / "sp.model")
    assert out.read_bytes() == T.BUILTIN_SP_MODEL.read_bytes()


def _tiny_qwen2_json(path):
    """A tokenizer.json in the Hugging Face format with the Qwen2 special ids (filler regular tokens up
    to id 151642, as in the real vocabulary, so the added tokens keep their official ids)."""
    vocab = {chr(c): i for i, c in enumerate(range(97, 123))}  # a..z
    vocab["Ġ"] = len(vocab)
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), 151643)})
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True}
             for t, i in sorted({"<|endoftext|>": 151643, **T.QWEN2_SPECIAL_IDS,
                                 **{f"<|extra_{k}|>": 151646 + k for k in range(6)}}.items(), key=lambda x: x[1])]
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                 "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                      "merges": []}}
    path.write_text(json.dumps(data))


def test_qwen2_backend_reads_tokenizer_json(tmp_path):
    _tiny_qwen2_json(tmp_path / "tokenizer.json")
    tok = T.load_tokenizer(f"qwen2:{tmp_path}")
    assert tok.special.im_start == 151644 and tok.special.vision_end == 151653
    ids = tok.encode("<|im_start|>ab c<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645
    assert tok.decode(ids) == "<|im_start|>ab c<|im_end|>"


def test_qwen2_backend_rejects_wrong_special_ids(tmp_path):
    _tiny_qwen2_json(tmp_path / "tokenizer.json")
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    full = json.loads(json.dumps(data))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|vision_end|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"\['<\|vision_end\|>'\] are missing"):
        T.load_tokenizer(f"qwen2:{tmp_path}")
    # A full-size vocabulary must put the specials at Qwen2's ids (here <|im_start|> and <|im_end|> swapped).
    for t in full["added_tokens"]:
        t["content"] = {"<|im_start|>": "<|im_end|>", "<|im_end|>": "<|im_start|>"}.get(t["content"], t["content"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(full))
    with pytest.raises(ValueError, match="do not match the Qwen2 ids"):
        T.load_tokenizer(f"qwen2:{tmp_path}")


def test_bad_specs_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer"):
        T.load_tokenizer("bpe:whatever")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T.load_tokenizer(f"qwen2:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        T.load_tokenizer(f"sentencepiece:{tmp_path}/missing.model")
