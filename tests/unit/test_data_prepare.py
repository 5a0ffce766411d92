"""memtrain.data.prepare: inputs of every type, the tokenizer recipe, shard/manifest layout, byte-identical output."""
from __future__ import annotations

import gzip
import json
import os

import pytest
import webdataset as wds

from memtrain.data import prepare
from memtrain.data.errors import DataError
from memtrain.data.manifest import load_manifest
from memtrain.data.shards import dtype_for_vocab, read_shard
from memtrain.data.sources import read_documents, expand_inputs
from memtrain.data.testing import prepare_tiny, write_corpus
from memtrain.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("corpus"))
    write_corpus(root)
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("prep") / "ds")
    prepare_tiny(corpus, out)
    return out


def texts_of(corpus: str) -> list[str]:
    return [d.text for d in read_documents(expand_inputs([os.path.join(corpus, "*")]))]


def test_manifest_records_tokenizer_shards_and_totals(prepared):
    m = load_manifest(prepared)
    raw = m.raw
    tok = Tokenizer(m.tokenizer_path)
    assert raw["tokenizer"]["file"] == "tokenizer.model" and raw["tokenizer"]["sha256"] == tok.sha256()
    assert raw["vocab_size"] == tok.vocab_size == 320 and raw["dtype"] == "uint16"
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert raw["totals"]["docs"] == 48 and raw["splits"]["val"]["docs"] == 6  # every 8th document, first included
    assert raw["totals"]["tokens"] == sum(s.tokens for s in m.shards)
    assert len(m.split("train")) > 3, "small --shard-tokens must give several shards"
    for s in m.shards:
        samples = read_shard(m.path(s), s.sha256, "uint16")
        assert len(samples) == s.docs and sum(len(x.tokens) for x in samples) == s.tokens


def test_every_input_type_is_read_and_round_trips(prepared, corpus):
    m = load_manifest(prepared)
    tok = Tokenizer(m.tokenizer_path)
    decoded = {tok.decode(x.tokens.tolist()) for s in m.shards for x in read_shard(m.path(s))}
    assert decoded == set(texts_of(corpus))  # .txt .md .py .jsonl .jsonl.gz, byte fallback: exact round trip


def test_tokenizer_recipe_keeps_whitespace_splits_digits_and_falls_back_to_bytes(prepared):
    tok = Tokenizer(load_manifest(prepared).tokenizer_path)
    text = "def f(x):\n\tif x:\n        return 12345  # ünïcode ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.unk_id not in ids
    digits = [tok.decode([i]) for i in tok.encode("12345")]
    assert all(len(p.strip()) <= 1 for p in digits)


def test_shards_are_webdataset_readable(prepared):
    m = load_manifest(prepared)
    url = m.path(m.split("train")[0])
    samples = list(wds.WebDataset(url, shardshuffle=False).decode())
    assert len(samples) == m.split("train")[0].docs
    assert samples[0]["tokens.npy"].dtype.name == "uint16"


def test_same_inputs_give_byte_identical_output(corpus, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    prepare_tiny(corpus, a, workers=1)
    prepare_tiny(corpus, b, workers=2)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def test_existing_tokenizer_is_reused_and_copied(prepared, corpus, tmp_path):
    out = str(tmp_path / "reuse")
    raw = prepare_tiny(corpus, out, extra=["--tokenizer", os.path.join(prepared, "tokenizer.model")])
    assert raw["tokenizer"]["sha256"] == load_manifest(prepared).raw["tokenizer"]["sha256"]
    assert [s["sha256"] for s in raw["shards"]] == [s.sha256 for s in load_manifest(prepared).shards]


def test_dtype_follows_vocabulary():
    assert dtype_for_vocab(65536) == "uint16" and dtype_for_vocab(65537) == "uint32"


def test_glob_matching_nothing_names_the_glob(tmp_path):
    args = prepare.parse_args(["--input", str(tmp_path / "nothing*.txt"), "--out", str(tmp_path / "o")])
    with pytest.raises(DataError, match=r"'.*nothing\*\.txt' matches no files"):
        prepare.prepare(args)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "c").mkdir()
    with gzip.open(tmp_path / "c" / "x.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl\.gz:2: needs a string \"text\" field"):
        prepare_tiny(str(tmp_path / "c"), str(tmp_path / "o"))


def test_vocab_too_large_for_corpus_is_a_data_error(corpus, tmp_path):
    with pytest.raises(DataError, match="vocab"):
        prepare_tiny(corpus, str(tmp_path / "o"), vocab_size=50000)


def test_binary_inputs_are_skipped_with_a_warning_naming_each(corpus, tmp_path, capsys):
    import random
    import shutil
    mixed = tmp_path / "mixed"
    shutil.copytree(corpus, mixed)
    rng = random.Random(0)
    (mixed / "nul.txt").write_bytes(b"PK\x03\x04\x00\x00" + b"looks like text\n" * 50)  # a NUL byte: binary
    (mixed / "blob.md").write_bytes(bytes(rng.randrange(1, 256) for _ in range(20000)))  # no NUL, mostly not UTF-8
    (mixed / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1") * 20)  # a little non-UTF-8: text
    raw = prepare_tiny(str(mixed), str(tmp_path / "o"))
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("warning: skipping")]
    assert len(warned) == 2 and "nul.txt" in warned[1] and "blob.md" in warned[0] and "binary" in err, err
    assert raw["source"]["files"] == len(os.listdir(corpus)) + 1  # the text files, latin1.txt included


def test_vocab_too_large_for_corpus_names_the_text_read_and_the_fix(corpus, tmp_path):
    with pytest.raises(DataError) as e:
        prepare_tiny(corpus, str(tmp_path / "o"), vocab_size=50000)
    msg = str(e.value)
    assert "too little text for --vocab-size 50000" in msg and "characters from" in msg, msg
    assert "or less" in msg and "lower --vocab-size or add text" not in msg, msg


def test_too_many_distinct_characters_asks_for_a_larger_vocabulary(tmp_path):
    import random
    corpus = tmp_path / "cjk"
    write_corpus(str(corpus), n_docs=10)
    chars = [chr(0x4E00 + i) for i in range(800)] * 60  # 800 characters, each too frequent to leave out
    random.Random(0).shuffle(chars)
    (corpus / "cjk.txt").write_text("\n".join("".join(chars[i:i + 80]) for i in range(0, len(chars), 80)))
    with pytest.raises(DataError, match=r"distinct characters .* raise --vocab-size to at least \d+"):
        prepare_tiny(str(corpus), str(tmp_path / "o"))
