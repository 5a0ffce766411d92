"""Long-context tasks: exact lengths, answers checked by an independent oracle, determinism, readability."""
from __future__ import annotations

import os
import re

import pytest

from memtrain.data.config import DataConfig
from memtrain.data.errors import DataError
from memtrain.data.stream import build_stream
from memtrain.data.tasks import exact_match, read_examples
from memtrain.data.tasks.__main__ import generate, parse_args
from memtrain.data.testing import tiny_dataset
from memtrain.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    # A larger vocabulary than the other tests so task words tokenize compactly.
    return tiny_dataset(str(tmp_path_factory.getbasetemp()), "tasks_src", vocab_size=400, n_docs=60)


def make(ds: str, out: str, task: str, length: int, num: int = 6, *extra: str) -> list:
    generate(parse_args(["--task", task, "--data", ds, "--out", out, "--length", str(length), "--num", str(num),
                         "--quiet", *extra]))
    return list(read_examples(out))


def oracle(task: str, story: list[str], question: str) -> str:
    """Recompute the answer from the story text alone (independent of the simulator's bookkeeping)."""
    where, holder, rooms = {}, {}, {}
    for s in story:
        actor, verb, thing = re.match(r"(\w+) (.+) the (\w+)\.$", s).groups()
        if thing in ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom"):
            where[actor] = thing
            for obj, h in holder.items():
                if h == actor:
                    rooms[obj].append(thing)
        elif verb in ("picked up", "got", "grabbed", "took"):
            holder[thing] = actor
            rooms.setdefault(thing, []).append(where[actor])
        else:
            holder[thing] = None
    if task == "qa1":
        return where[re.match(r"Where is (\w+)\?", question).group(1)]
    obj = re.search(r"the (\w+)", question).group(1)
    if task == "qa2":
        return where[holder[obj]]
    hist = [r for i, r in enumerate(rooms[obj]) if i == 0 or r != rooms[obj][i - 1]]
    before = re.search(r"before the (\w+)", question).group(1)
    return hist[len(hist) - 1 - hist[::-1].index(before) - 1]


@pytest.mark.parametrize("task,facts", [("qa1", 1), ("qa2", 2), ("qa3", 3)])
def test_babi_answers_match_an_oracle_and_support_counts(ds, tmp_path, task, facts):
    tok = Tokenizer(os.path.join(ds, "tokenizer.model"))
    for ex in make(ds, str(tmp_path / task), task, 900, 10):
        assert len(ex.tokens) == 900
        assert len(ex.meta["support"]) == facts
        assert oracle(task, ex.meta["story"], ex.meta["question"]) == ex.answer
        assert exact_match(tok.decode(ex.answer_ids.tolist()), ex.answer)
        prompt = tok.decode(ex.prompt.tolist())
        assert prompt.rstrip().endswith("Answer:") and ex.meta["question"] in prompt
        at = 0
        for sentence in ex.meta["story"]:  # every sentence intact, in story order (ValueError otherwise)
            at = prompt.index(sentence, at) + len(sentence)


@pytest.mark.parametrize("length", [300, 1000, 4000])
def test_niah_exact_length_needle_at_depth(ds, tmp_path, length):
    tok = Tokenizer(os.path.join(ds, "tokenizer.model"))
    for ex in make(ds, str(tmp_path / "n"), "niah_single", length, 4, "--depth", "0.5"):
        assert len(ex.tokens) == length and ex.answer.isdigit() and len(ex.answer) == 7
        prompt = tok.decode(ex.prompt.tolist())
        needle = f"One of the special magic numbers for {ex.meta['key']} is: {ex.answer}."
        assert prompt.count(needle) == 1 and prompt.endswith("mentioned in the provided text is")
        assert abs(ex.meta["sentence_positions"][0] / length - 0.5) < 0.15
        assert tok.decode(ex.answer_ids.tolist()).strip() == ex.answer


def test_same_seed_same_bytes_other_seed_differs(ds, tmp_path):
    a = make(ds, str(tmp_path / "a"), "qa2", 600, 3, "--seed", "5")
    b = make(ds, str(tmp_path / "b"), "qa2", 600, 3, "--seed", "5")
    c = make(ds, str(tmp_path / "c"), "qa2", 600, 3, "--seed", "6")
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert [x.tokens.tolist() for x in a] == [x.tokens.tolist() for x in b] != [x.tokens.tolist() for x in c]


def test_task_shards_stream_like_any_data(ds, tmp_path):
    make(ds, str(tmp_path / "t"), "qa1", 500, 4, "--train-num", "4")
    s = build_stream(DataConfig(path=str(tmp_path / "t"), seq_len=128, batch_size=2))
    assert next(s).inputs.shape == (2, 128)


def test_too_short_length_is_a_data_error(ds, tmp_path):
    with pytest.raises(DataError, match="--length 20 is too short"):
        make(ds, str(tmp_path / "x"), "qa3", 20, 1)


def test_exact_match_normalises_case_space_and_punctuation():
    assert exact_match(" Kitchen.\nmore text", "kitchen")
    assert not exact_match("the kitchen", "kitchen")
