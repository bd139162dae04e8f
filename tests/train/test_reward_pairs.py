"""A reward model's over-long pairs are cut to data.max_seq_len, as the recipe says: TRL's
RewardTrainer would drop them (launcher/train/reward.py). Built here with a tiny model and
the rank's own trainer class, without training."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock


def test_over_long_reward_pairs_are_truncated_not_dropped(tmp_path: Path) -> None:
    import datasets
    import transformers
    import trl
    from accelerate.state import AcceleratorState

    from launcher.tiny import write_tiny
    from launcher.train.trainers import trl_trainer

    base = write_tiny("llama", tmp_path / "m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    long_answer = " ".join(["the story was good"] * 40)
    rows = [
        {"chosen": "the food was good", "rejected": "the food was bad"},
        {"chosen": long_answer, "rejected": "bad"},  # chosen far over the limit
    ]
    limit = 16
    whole = [len(tokenizer(r["chosen"] + tokenizer.eos_token).input_ids) for r in rows]
    assert whole[1] > limit >= whole[0]

    def prepared(cls: type) -> list[dict[str, list[int]]]:
        with mock.patch.dict(os.environ):
            try:
                args = trl.RewardConfig(
                    output_dir=str(tmp_path / "out"), max_length=limit, report_to=[], use_cpu=True
                )
                trainer = cls(
                    model=model,
                    args=args,
                    train_dataset=datasets.Dataset.from_list(rows),
                    processing_class=tokenizer,
                )
                return list(trainer.train_dataset)
            finally:
                AcceleratorState._reset_state(reset_partial_state=True)

    assert len(prepared(trl.RewardTrainer)) == 1, "TRL's own trainer drops the long pair"
    ours = prepared(trl_trainer("reward"))
    assert len(ours) == 2, "the long pair must be kept"
    assert [len(r["chosen_ids"]) for r in ours] == [whole[0], limit]
    full = tokenizer(long_answer + tokenizer.eos_token).input_ids
    assert ours[1]["chosen_ids"] == full[:limit]  # its start kept, as axolotl and LLaMA-Factory
