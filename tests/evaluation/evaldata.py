"""Small generated evaluation data in the layout of ../shared/data, so that the harness's own logic
(haystacks, cutting, the grid, resumption, the report) is tested in any clone.

Seeded sentence templates: QuALITY-style articles with four-option questions whose answers are in
the text, and SQuALITY-style stories long enough to cut a haystack and a continuation from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ("Ada", "Borin", "Cela", "Dunmore", "Elsa", "Farid", "Greta", "Hollis", "Ines", "Jarek")
PLACES = ("the mill", "the harbour", "the old school", "the ridge", "the market", "the chapel", "the orchard")
THINGS = ("a lantern", "a ledger", "a brass key", "a map", "a violin", "a compass", "a clock")
COLORS = ("red", "blue", "green", "grey", "yellow", "white")
VERBS = ("walked to", "wrote about", "painted", "argued over", "slept near", "repaired the roof of")


def _sentence(rng: random.Random) -> str:
    return (f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(PLACES)} and carried "
            f"{rng.choice(THINGS)} that was {rng.choice(COLORS)}.")


def _article(rng: random.Random, n_sentences: int, n_questions: int) -> dict:
    sentences = [_sentence(rng) for _ in range(n_sentences)]
    instructions, outputs = [], []
    for q in range(n_questions):
        who, color = NAMES[q % len(NAMES)], rng.choice(COLORS)
        sentences.insert(rng.randrange(len(sentences) + 1), f"The boat of {who} was painted {color}.")
        options = [color] + rng.sample([c for c in COLORS if c != color], 3)
        rng.shuffle(options)
        letters = "ABCD"
        instructions.append(f"What color was the boat of {who}?\n"
                            + "\n".join(f"({letters[i]}) {o}" for i, o in enumerate(options)))
        gold = options.index(color)
        outputs.append(f"({letters[gold]}) {color}")
    return {"input": " ".join(sentences), "instructions": instructions, "outputs": outputs}


def write(folder: Path, n_articles: int = 9, n_stories: int = 2, seed: int = 0) -> Path:
    """Write leval-quality.jsonl and squality-dev.jsonl under ``folder``; returns ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "leval-quality.jsonl", "w") as fh:
        for _ in range(n_articles):
            fh.write(json.dumps(_article(rng, 120, 4)) + "\n")
    with open(folder / "squality-dev.jsonl", "w") as fh:
        for _ in range(n_stories):
            fh.write(json.dumps({"document": " ".join(_sentence(rng) for _ in range(400))}) + "\n")
    return folder
