"""Regenerate recipes/data/quickstart_{train,eval}.jsonl (deterministic).

The task: say whether a short review is positive or negative. Each review carries one
sentiment word; eval reviews use subject/template pairs never seen in training, so a
model must learn the words, not memorise sentences.
"""

import json
import random
from pathlib import Path

POSITIVE = [
    "great",
    "good",
    "wonderful",
    "excellent",
    "lovely",
    "amazing",
    "superb",
    "fantastic",
    "delightful",
    "brilliant",
    "pleasant",
    "perfect",
]
NEGATIVE = [
    "bad",
    "awful",
    "terrible",
    "horrible",
    "boring",
    "dreadful",
    "poor",
    "nasty",
    "disappointing",
    "dull",
    "painful",
    "mediocre",
]
SUBJECTS = [
    "the movie",
    "the food",
    "the service",
    "the book",
    "the hotel",
    "the concert",
    "the game",
    "the show",
    "the coffee",
    "the trip",
    "the room",
    "the music",
]
TEMPLATES = [
    "{s} was {w}.",
    "honestly, {s} was {w}.",
    "i think {s} was {w}.",
    "{s} was really {w}.",
    "we found {s} {w}.",
    "overall {s} felt {w}.",
]
INSTRUCTION = "Is this review positive or negative?"


def rows(pairs, rng):
    out = []
    for subject, template in pairs:
        for word, label in [(w, "positive") for w in POSITIVE] + [
            (w, "negative") for w in NEGATIVE
        ]:
            out.append(
                {
                    "instruction": INSTRUCTION,
                    "input": template.format(s=subject, w=word),
                    "output": label,
                }
            )
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(0)
    pairs = [(s, t) for s in SUBJECTS for t in TEMPLATES]
    rng.shuffle(pairs)
    eval_pairs, train_pairs = pairs[:3], pairs[3:23]
    out = Path(__file__).resolve().parents[1] / "recipes" / "data"
    for name, part in (("train", train_pairs), ("eval", eval_pairs)):
        data = rows(part, rng)
        if name == "eval":
            data = data[:60]
        with (out / f"quickstart_{name}.jsonl").open("w") as fh:
            for row in data:
                fh.write(json.dumps(row) + "\n")
        print(name, len(data))


if __name__ == "__main__":
    main()
