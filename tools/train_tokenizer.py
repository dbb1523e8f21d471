"""Trains the built-in sentencepiece tokenizer of the tiny configs (g2vlm_jax/assets/tiny_sp.model).

The corpus is regenerated deterministically: the questions and answers of synthetic spatial-QA
scenes (the task families of CORPUS_TASKS), the reconstruction prompt and the chat-template strings. Training is
single-threaded with fixed settings, so the same corpus gives the same model. Digits are split
(`split_digits`): every number is one token per digit, as in Qwen2's vocabulary, so a numeric answer
is learnt digit by digit rather than as one of many whole-number tokens.

    python tools/train_tokenizer.py [--out g2vlm_jax/assets/tiny_sp.model] [--vocab 512]
"""
from __future__ import annotations

import argparse
import io
import pathlib
import string

from g2vlm_jax import tokenizer as tokenizer_lib

CHAT_STRINGS = [
    "Reconstruct the 3D scene.",
    "system\nYou are a helpful assistant.",
    "user\n", "assistant\n", "0123456789.,:;?!()-+/%",
    "Answer with a number in metres.", "Answer with the option letter.",
    # Every printable ASCII character is a piece (character_coverage=1.0 keeps each one seen): without
    # these lines q, z, E-G, J-V, Z, quotes, brackets, ... were absent from the synthetic corpus and a
    # user's question to `g2vlm chat` lost them to <unk>.
    string.ascii_lowercase, string.ascii_uppercase, string.punctuation,
]


# The families whose text the built-in model was trained on. Pinned: a family added to spatial_qa.TASKS
# later (marker_row) is written with these pieces (every printable character is one) instead of silently
# changing the vocabulary, which would change every tiny run's token ids and the measured results.
CORPUS_TASKS = ("distance", "depth", "closer", "count", "direction", "camera_motion")


def corpus_lines(num_scenes: int = 96) -> list[str]:
    """Deterministic training text: synthetic QA (CORPUS_TASKS) of `num_scenes` training scenes + chat strings."""
    from data_pipelines.synthetic.render import RenderConfig
    from data_pipelines.synthetic.spatial_qa import QAConfig, synthetic_qa_scene

    lines = list(CHAT_STRINGS)
    cfg = RenderConfig(height=28, width=28, num_views=4)
    for index in range(num_scenes):
        for qa in synthetic_qa_scene("train", index, cfg, QAConfig(tasks=CORPUS_TASKS)).scene.qa:
            lines.extend([qa.question, qa.answer, *qa.choices])
    return lines


def train(out: pathlib.Path, vocab_size: int = 512, num_scenes: int = 96) -> pathlib.Path:
    import sentencepiece as spm

    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines(num_scenes)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=False, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        user_defined_symbols=list(tokenizer_lib.SPECIAL_TOKENS), pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
        shuffle_input_sentence=False, minloglevel=2, hard_vocab_limit=False, split_digits=True)
    out.write_bytes(model.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(tokenizer_lib.BUILTIN_SP_MODEL))
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args()
    print("wrote", train(pathlib.Path(args.out), args.vocab))


if __name__ == "__main__":
    main()
