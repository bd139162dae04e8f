"""Write recipes/data/sentiment_kto.jsonl: the sentiment preference pairs unpaired for KTO.

Each pair of recipes/data/sentiment_preference.jsonl gives two rows, its chosen answer as a
desirable completion (label true) and its rejected answer as an undesirable one (label false),
shuffled with a fixed seed: TRL's KTOTrainer reads rows in order (its KL estimate pairs each
row with its neighbours in a micro-batch), so the file's order is the training order.

    python scripts/make_kto_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "recipes" / "data"


def unpaired(pairs: list[dict[str, str]], seed: int = 0) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    random.Random(seed).shuffle(rows)
    return rows


def main() -> None:
    for source, target in (
        ("sentiment_preference.jsonl", "sentiment_kto.jsonl"),
        ("sentiment_preference_eval.jsonl", "sentiment_kto_eval.jsonl"),
    ):
        lines = (DATA / source).read_text().splitlines()
        pairs = [json.loads(line) for line in lines if line.strip()]
        text = "".join(json.dumps(row) + "\n" for row in unpaired(pairs))
        (DATA / target).write_text(text)
        print(f"{target}: {text.count(chr(10))} rows")


if __name__ == "__main__":
    main()
