"""bAbI-style fact chains (qa1-qa3) from a small world simulator, scattered in order through filler.

The world: actors move between rooms and pick up and drop objects; a carried object moves with its actor.
A story is a random valid event sequence; a question is accepted only if it has the task's exact number of
supporting facts and an unambiguous answer (otherwise the story is redrawn from the same seeded generator):
- qa1 "Where is ACTOR?" — the actor's last move (1 fact);
- qa2 "Where is the OBJECT?" — the object is carried: the pickup and the carrier's last move (2 facts);
- qa3 "Where was the OBJECT before the ROOM?" — pickup, move to the earlier room, move to ROOM (3 facts).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from memtrain.data.tasks.assemble import Built, assemble
from memtrain.data.tasks.filler import Filler
from memtrain.data.tokenizer import Tokenizer

ACTORS = ["Mary", "John", "Sandra", "Daniel"]
ROOMS = ["bathroom", "hallway", "kitchen", "garden", "office", "bedroom"]
OBJECTS = ["apple", "football", "milk"]
MOVE = ["moved to", "went to", "journeyed to", "travelled to", "went back to"]
TAKE = ["picked up", "got", "grabbed", "took"]
DROP = ["dropped", "discarded", "put down", "left"]
INTRO = "Read the story hidden in the text below, then answer the question with one word.\n"


@dataclass
class Story:
    sentences: list[str]
    question: str
    answer: str
    support: list[int]
    """Indices into `sentences` of the supporting facts."""


def _simulate(rng: random.Random, n_events: int) -> tuple[list[str], list[tuple]]:
    where: dict[str, str] = {}
    holder: dict[str, str | None] = {o: None for o in OBJECTS}
    obj_room: dict[str, str | None] = {o: None for o in OBJECTS}
    sentences, events = [], []
    while len(sentences) < n_events:
        actor = rng.choice(ACTORS)
        held = [o for o in OBJECTS if holder[o] == actor]
        here = [o for o in OBJECTS if holder[o] is None and obj_room[o] is not None and obj_room[o] == where.get(actor)]
        unplaced = [o for o in OBJECTS if obj_room[o] is None]
        r = rng.random()
        if actor in where and r < 0.25 and (here or unplaced):
            obj = rng.choice(here or unplaced)
            holder[obj], obj_room[obj] = actor, where[actor]
            sentences.append(f"{actor} {rng.choice(TAKE)} the {obj}.")
            events.append(("take", actor, obj, where[actor]))
        elif held and r < 0.35:
            obj = rng.choice(held)
            holder[obj] = None
            sentences.append(f"{actor} {rng.choice(DROP)} the {obj}.")
            events.append(("drop", actor, obj, where[actor]))
        else:
            room = rng.choice([x for x in ROOMS if x != where.get(actor)])
            where[actor] = room
            for o in held:
                obj_room[o] = room
            sentences.append(f"{actor} {rng.choice(MOVE)} the {room}.")
            events.append(("move", actor, room, tuple(held)))
    return sentences, events


def _last(events: list[tuple], pred, before: int | None = None) -> int | None:
    for i in range(len(events) - 1 if before is None else before - 1, -1, -1):
        if pred(events[i]):
            return i
    return None


def _question(task: str, events: list[tuple], rng: random.Random) -> tuple[str, str, list[int]] | None:
    if task == "qa1":
        actor = rng.choice(ACTORS)
        i = _last(events, lambda e: e[0] == "move" and e[1] == actor)
        return None if i is None else (f"Where is {actor}?", events[i][2], [i])
    obj = rng.choice(OBJECTS)
    t = _last(events, lambda e: e[0] in ("take", "drop") and e[2] == obj)
    if t is None or events[t][0] != "take":
        return None  # qa2/qa3 ask about a carried object
    actor = events[t][1]
    m = _last(events, lambda e: e[0] == "move" and e[1] == actor)
    if task == "qa2":
        if m is None:
            return None
        return f"Where is the {obj}?", events[m][2] if m > t else events[t][3], sorted({t, m})
    # qa3: the object's rooms after the pickup: where it was picked up, then each of the carrier's moves.
    moves = [i for i in range(t + 1, len(events)) if events[i][0] == "move" and events[i][1] == actor]
    if not moves:
        return None
    before_last = _last(events, lambda e: e[0] == "move" and e[1] == actor, before=t)
    rooms = [events[t][3]] + [events[i][2] for i in moves]
    if rooms.count(rooms[-1]) > 1 or before_last is None or len(moves) != 1:
        return None  # "before the ROOM" must be unambiguous and need exactly three facts
    return f"Where was the {obj} before the {rooms[-1]}?", rooms[-2], [before_last, t, moves[-1]]


def make_story(task: str, rng: random.Random, n_events: int) -> Story:
    while True:
        sentences, events = _simulate(rng, n_events)
        q = _question(task, events, rng)
        if q is not None:
            return Story(sentences, q[0], q[1], q[2])


def babi(task: str, tok: Tokenizer, filler: Filler, rng: random.Random, length: int, n_events: int = 12) -> Built:
    story = make_story(task, rng, n_events)
    depths = sorted(rng.random() for _ in story.sentences)
    built = assemble(tok, filler, rng, length=length, intro=INTRO, sentences=story.sentences, depths=depths,
                     question=f"\nQuestion: {story.question} Answer:", answer=story.answer)
    built.meta.update({"question": story.question, "story": story.sentences, "support": story.support})
    return built
