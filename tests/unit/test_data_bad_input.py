"""Bad shards and tokenizers: one-line errors naming the file, or a warning and a skip with skip_bad_shards."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from memtrain.data.config import DataConfig
from memtrain.data.errors import DataError, DataWarning
from memtrain.data.manifest import load_manifest
from memtrain.data.shards import read_shard, write_shard
from memtrain.data.stream import build_stream
from memtrain.data.testing import tiny_dataset
from memtrain.data.verify import main as verify_main


@pytest.fixture()
def ds(tmp_path_factory, tmp_path) -> str:
    src = tiny_dataset(str(tmp_path_factory.getbasetemp()))
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


def first_train(path: str) -> str:
    return load_manifest(path).split("train")[0].file


def cfg(path: str, **kw) -> DataConfig:
    return DataConfig(path=path, seq_len=16, batch_size=2, shuffle_buffer=0, seed=1, **kw)


def read_all(stream, n: int = 400) -> None:
    for _ in range(n):
        next(stream)


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(700)
        b = f.read(1)
        f.seek(700)
        f.write(bytes([b[0] ^ 0xFF]))


def rewrite_checksum(ds: str, name: str) -> None:
    """Make the manifest agree with a damaged file, so the tar parser itself has to notice."""
    import hashlib
    path = os.path.join(ds, "manifest.json")
    raw = json.load(open(path))
    for s in raw["shards"]:
        if s["file"] == name:
            s["sha256"] = hashlib.sha256(open(os.path.join(ds, name), "rb").read()).hexdigest()
    json.dump(raw, open(path, "w"))


@pytest.mark.parametrize("damage,msg", [(truncate, "sha256"), (flip_byte, "sha256")])
def test_damaged_shard_is_one_line_error_naming_it(ds, damage, msg):
    name = first_train(ds)
    damage(os.path.join(ds, name))
    with pytest.raises(DataError, match=msg) as e:
        read_all(build_stream(cfg(ds)))
    assert name in str(e.value) and "\n" not in str(e.value) and "skip_bad_shards" in str(e.value)


def test_corrupt_tar_with_matching_checksum_is_caught_by_the_parser(ds):
    name = first_train(ds)
    with open(os.path.join(ds, name), "r+b") as f:
        f.write(b"\x00garbage" * 64)  # destroys the first member header
    rewrite_checksum(ds, name)
    with pytest.raises(DataError, match=name):
        read_all(build_stream(cfg(ds)))


def test_truncated_tar_without_checksum_is_caught(ds):
    name = first_train(ds)
    path = os.path.join(ds, name)
    with open(path, "r+b") as f:
        f.truncate(900)
    with pytest.raises(DataError, match=name):
        read_shard(path)


def test_token_ids_outside_the_vocabulary_are_one_line_error_naming_the_shard(ds):
    # shards made with another (bigger) tokenizer: same counts and a valid checksum, but ids >= vocab_size
    m = load_manifest(ds)
    name = first_train(ds)
    samples = read_shard(m.path(m.split("train")[0]))
    samples[-1].tokens[-1] = m.vocab_size + 5
    write_shard(os.path.join(ds, name), [(s.key, s.tokens, s.fields) for s in samples])
    rewrite_checksum(ds, name)
    with pytest.raises(DataError, match="outside the manifest's vocabulary of 320") as e:
        read_all(build_stream(cfg(ds)))
    assert name in str(e.value) and "\n" not in str(e.value) and "memtrain.data.prepare" in str(e.value)


def test_skip_bad_shards_warns_counts_and_goes_on(ds):
    m = load_manifest(ds)
    name = first_train(ds)
    bad_docs = {tuple(s.tokens.tolist()) for s in read_shard(m.path(m.split("train")[0]))}
    flip_byte(os.path.join(ds, name))
    s = build_stream(cfg(ds, skip_bad_shards=True))
    with pytest.warns(DataWarning, match=name):
        batches = [next(s) for _ in range(400)]
    assert s.skipped_shards >= 1
    stream_tokens = [t for b in batches for t in b.inputs.flatten().tolist()]
    docs, cur = set(), []
    for t in stream_tokens:
        if t == 2:
            docs.add(tuple(cur))
            cur = []
        else:
            cur.append(t)
    assert not docs & bad_docs


def test_tokenizer_with_other_vocab_is_refused(ds, tmp_path_factory):
    other = tiny_dataset(str(tmp_path_factory.getbasetemp()), "tiny300", vocab_size=300)
    shutil.copyfile(os.path.join(other, "tokenizer.model"), os.path.join(ds, "tokenizer.model"))
    with pytest.raises(DataError, match="vocab size 300, manifest says 320"):
        build_stream(cfg(ds))


def test_verify_names_each_bad_shard(ds, capsys):
    assert verify_main([ds]) == 0
    names = [s.file for s in load_manifest(ds).split("train")[:2]]
    truncate(os.path.join(ds, names[0]))
    flip_byte(os.path.join(ds, names[1]))
    assert verify_main([ds]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("BAD ") for line in err)
    assert names[0] in err[0] and names[1] in err[1]
