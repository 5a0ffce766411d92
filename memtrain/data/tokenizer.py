"""A thin wrapper around a sentencepiece model, and the training recipe `memtrain.data.prepare` uses.

The recipe is fixed because every dataset and every checkpoint depends on it: BPE with byte fallback (no
unknown tokens, any text round-trips), digits split one per token, identity normalisation and no whitespace
collapsing (source code keeps its indentation; decode(encode(s)) == s), and explicit special ids
unk=0, bos=1, eos=2, pad=3. A newline is its own piece because training sentences are single lines.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable

import sentencepiece as spm

from memtrain.data.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# 4 specials + 256 byte pieces + the newline piece: the smallest vocabulary the recipe can produce.
MIN_VOCAB = 261


class Tokenizer:
    """`Tokenizer(path)`: encode/decode with a sentencepiece model file."""

    def __init__(self, path: str) -> None:
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise DataError(f"tokenizer {self.path} not found; run `python -m memtrain.data.prepare` or pass --tokenizer FILE")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(self.path)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"tokenizer {self.path} is not a sentencepiece model ({exc}); re-run memtrain.data.prepare")

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added; the stream puts EOS between documents)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of many texts, encoded by `num_threads` sentencepiece threads (order is kept)."""
        return self._sp.encode(texts, num_threads=max(1, num_threads))

    def piece_to_id(self, piece: str) -> int:
        """Id of a vocabulary piece (e.g. "\n"); the unknown id when the piece is not in the vocabulary."""
        return int(self._sp.piece_to_id(piece))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def sha256(self) -> str:
        return file_sha256(self.path)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train_tokenizer(sentences: list[str], out_path: str, vocab_size: int) -> Tokenizer:
    """Train the BPE recipe on `sentences` (already sampled: every one is used) and write `out_path`.

    The caller samples the sentences deterministically; sentencepiece's own sampling is switched off
    (`input_sentence_size=0`) and it trains on one thread (its multi-threaded BPE merges can tie-break
    differently), so the same corpus always gives the same model file.
    """
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small; the byte-fallback recipe needs at least {MIN_VOCAB}")
    if not sentences:
        raise DataError(f"no text to train the tokenizer on for {out_path}; check the --input files")
    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, character_coverage=0.9995,
            input_sentence_size=0, max_sentence_length=8192, num_threads=1, minloglevel=2,
        )
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise DataError(f"sentencepiece could not train {out_path}: {msg}; lower --vocab-size or add text")
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out_path)
    return Tokenizer(out_path)
