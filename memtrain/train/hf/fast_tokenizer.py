"""`tokenizer.json`: a Hugging Face fast tokenizer (`tokenizers`) that gives exactly the ids of memtrain's
sentencepiece model, so `AutoTokenizer.from_pretrained(export_dir)` works without remote code.

memtrain's recipe (memtrain/data/tokenizer.py): BPE with byte fallback, identity normalisation, a dummy-prefix
space, whitespace escaped as "▁" and kept (runs of spaces are pieces too), digits split, "\\n" a piece of its own.
Its `tokenizers` equivalent:
- normaliser: prepend one "▁" to the whole text (sentencepiece's dummy prefix: once, not per line), then every
  space -> "▁" (identity otherwise); no pre-tokenizer: sentencepiece never made a piece across the boundaries its
  own splitting respects, so merges cannot cross them either;
- model: BPE over the sentencepiece vocabulary (same ids), merges from the pieces ordered by their scores (the
  order sentencepiece's BPE applies them), unknown characters as <0xNN> byte pieces;
- special tokens are not parsed in text (`split_special_tokens`), as in training;
- decoder: "▁" -> " ", byte pieces -> bytes, the dummy prefix's space stripped.
tests/e2e/test_export.py compares ids and decoding with sentencepiece on the training corpus.
"""
from __future__ import annotations

from pathlib import Path

NORMAL, USER_DEFINED = 1, 4  # sentencepiece ModelProto.SentencePiece.Type values


def build_fast_tokenizer(model_file: Path, special: dict[str, str]):
    """A `tokenizers.Tokenizer` equal to the sentencepiece model `model_file`; `special` maps role -> piece
    (unk_token, bos_token, eos_token, pad_token) as the export's tokenizer_config names them."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = []
    for i, p in enumerate(proto.pieces):
        if p.type != NORMAL:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in vocab and right in vocab:
                merges.append((-p.score, vocab[left], vocab[right], left, right))
    merges.sort()  # highest score first; ties by the parts' ids, deterministic
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in merges],
                               unk_token=special.get("unk_token", "<unk>"), fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in special.values()])
    tok.encode_special_tokens = True  # "<s>" in text is text, as sentencepiece encoded it in training
    return tok


def write_fast_tokenizer(out: Path, model_file: Path, special: dict[str, str]) -> None:
    """OUT/tokenizer.json for the sentencepiece model `model_file`."""
    build_fast_tokenizer(model_file, special).save(str(out / "tokenizer.json"))
