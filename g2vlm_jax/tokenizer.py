"""One tokenizer interface, two backends.

- `sentencepiece`: small vocabularies for tiny configs. The built-in model
  (`g2vlm_jax/assets/tiny_sp.model`, vocab 512) is trained by `tools/train_tokenizer.py` from a
  corpus the repository regenerates (synthetic spatial-QA text + chat strings).
- `qwen2`: the byte-level BPE vocabulary of the official checkpoint, read from its
  `tokenizer.json` with the `tokenizers` library; special ids as in SPEC 1.4.

Specs accepted by `load_tokenizer`: 'sentencepiece:builtin', 'sentencepiece:PATH.model',
'qwen2:DIR_OR_tokenizer.json'.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import pathlib

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
QWEN2_SPECIAL_IDS = {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                     "<|vision_end|>": 151653}
BUILTIN_SP_MODEL = pathlib.Path(__file__).parent / "assets" / "tiny_sp.model"


@functools.cache  # read once per process: every checkpoint save and load asks
def builtin_fingerprint() -> str:
    """sha256 of the built-in model file: a run records it, so a checkpoint trained with another version of
    the vocabulary (the file changed on 2026-12-06 to cover all printable ASCII) is refused, not decoded
    into wrong text."""
    return hashlib.sha256(BUILTIN_SP_MODEL.read_bytes()).hexdigest()


def is_builtin(spec: str) -> bool:
    kind, _, where = spec.partition(":")
    return kind == "sentencepiece" and where in ("", "builtin")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    pad: int


class Tokenizer(abc.ABC):
    """encode/decode text; `special` holds the ids the sequence builder needs."""

    vocab_size: int
    special: SpecialIds

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> token ids (no BOS/EOS added)."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Token ids -> text."""


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece model whose user-defined symbols include the four chat/vision specials."""

    def __init__(self, model_path: str | pathlib.Path):
        import sentencepiece as spm

        path = pathlib.Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {path} not found; train one with tools/train_tokenizer.py")
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        ids = {tok: self._sp.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i == self._sp.unk_id()]
        if missing:
            raise ValueError(f"sentencepiece model {path} lacks special tokens {missing}; retrain it with "
                             "tools/train_tokenizer.py (they are user-defined symbols)")
        self.vocab_size = self._sp.get_piece_size()
        self.special = SpecialIds(ids["<|im_start|>"], ids["<|im_end|>"], ids["<|vision_start|>"],
                                  ids["<|vision_end|>"], pad=max(self._sp.pad_id(), 0))

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class Qwen2Tokenizer(Tokenizer):
    """Qwen2 byte-level BPE from a Hugging Face `tokenizer.json` (no transformers needed)."""

    def __init__(self, path: str | pathlib.Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"Qwen2 tokenizer file {path} not found; pass the checkpoint directory that "
                                    "holds tokenizer.json")
        self._tok = HFTokenizer.from_file(str(path))
        ids = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.vocab_size = self._tok.get_vocab_size()
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{path}: special tokens {missing} are missing; a Qwen2 tokenizer.json defines "
                             f"{list(QWEN2_SPECIAL_IDS)}")
        # A full-size vocabulary must be Qwen2's own (the checkpoint's embedding rows depend on it); a
        # small one (a tiny test checkpoint in the Qwen2 format) places the specials where it likes.
        if self.vocab_size > max(QWEN2_SPECIAL_IDS.values()) and ids != QWEN2_SPECIAL_IDS:
            raise ValueError(f"{path}: special tokens {ids} do not match the Qwen2 ids {QWEN2_SPECIAL_IDS}")
        pad = self._tok.token_to_id("<|endoftext|>")
        self.special = SpecialIds(ids["<|im_start|>"], ids["<|im_end|>"], ids["<|vision_start|>"],
                                  ids["<|vision_end|>"], pad=pad if pad is not None else 0)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """'sentencepiece:builtin' | 'sentencepiece:PATH' | 'qwen2:PATH' -> Tokenizer."""
    kind, _, where = spec.partition(":")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(BUILTIN_SP_MODEL if where in ("", "builtin") else where)
    if kind == "qwen2":
        return Qwen2Tokenizer(where)
    raise ValueError(f"tokenizer spec {spec!r}: expected 'sentencepiece:builtin', 'sentencepiece:PATH' or "
                     "'qwen2:PATH' (data.tokenizer)")
