"""train.kto_kl_pairing=previous_row: at one row per micro-batch, every row's KL completion is
another row's, chosen by LLaMA-Factory's rule (launcher/train/kto_pairs.py). Built here with a
tiny model and the rank's own trainer class, without training."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest


def llamafactory_partners(rows: int, workers: int, batch: int) -> list[int]:
    """The row whose completion each row's KL sequence takes in LLaMA-Factory: its preprocessing
    map splits the rows into `workers` contiguous shards (the first `rows % workers` one row
    longer), each into batches of `batch` rows, and FeedbackDatasetProcessor gives each row the
    previous row's completion of its batch, the first row the batch's last."""
    partners: list[int] = []
    start = 0
    for shard in range(workers):
        end = start + rows // workers + (1 if shard < rows % workers else 0)
        for first in range(start, end, batch):
            chunk = list(range(first, min(first + batch, end)))
            partners += chunk[-1:] + chunk[:-1]
        start = end
    return partners


def test_llamafactory_rule_as_written() -> None:
    # 12 rows, 2 workers: shards 0-5 and 6-11; batches of 4: [0-3] [4-5] [6-9] [10-11]
    assert llamafactory_partners(12, 2, 4) == [3, 0, 1, 2, 5, 4, 9, 6, 7, 8, 11, 10]
    # one process: [0-3] [4-7] [8-11]
    assert llamafactory_partners(12, 1, 4) == [3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10]


def test_one_row_per_micro_batch_pairs_each_row_with_the_previous_row(tmp_path: Path) -> None:
    import datasets
    import transformers
    import trl
    from accelerate.state import AcceleratorState
    from torch.utils.data import RandomSampler

    from launcher.tiny import write_tiny
    from launcher.train import kto_pairs

    base = write_tiny("llama", tmp_path / "m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    count, workers, batch = 12, 2, 4  # a shard ends inside a batch: the shards count
    rows = [
        {"prompt": f"question {i}:", "completion": f" answer number {i}", "label": i % 3 != 0}
        for i in range(count)
    ]
    long_row = 5  # its prompt fills max_length: TRL drops it, after the pairing
    rows[long_row]["prompt"] = "question " * 80 + ":"

    def trainer_of(cls: type, order: str = "random") -> Any:
        args = trl.KTOConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=1,
            train_sampling_strategy=order,  # random: the plan's for previous_row (kto_order)
            dataset_num_proc=workers,
            max_length=64,
            report_to=[],
            use_cpu=True,
        )
        return cls(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
        )

    with mock.patch.dict(os.environ):
        try:
            with pytest.raises(ValueError, match=r"batch size must be > 1"):
                trainer_of(trl.KTOTrainer, "sequential")  # TRL's own pairing refuses one row
            with mock.patch.object(kto_pairs, "PREPROCESSING_BATCH", batch):
                trainer = trainer_of(kto_pairs.previous_row_kto_trainer())
            prepared = list(trainer.train_dataset)
            sampler = trainer._get_train_sampler()
            loader = trainer.get_train_dataloader()
            first = next(iter(loader))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)

    assert kto_pairs.PREPROCESSING_BATCH == 1000  # LLaMA-Factory's preprocessing_batch_size

    def row_of(ids: list[int]) -> int:  # every completion tells its row
        found = re.search(r"answer number (\d+)", tokenizer.decode(ids))
        assert found, ids
        return int(found.group(1))

    kept = [row_of(r["completion_ids"]) for r in prepared]
    assert kept == [i for i in range(count) if i != long_row]
    partners = [row_of(r["KL_completion_ids"]) for r in prepared]
    assert all(p != i for i, p in zip(kept, partners, strict=True)), "a row paired with itself"
    rule = llamafactory_partners(count, workers, batch)
    assert partners == [rule[i] for i in kept]  # the dropped row still lends its completion
    assert long_row in partners
    # the recipe's arguments train: one row per micro-batch, drawn in random order
    assert trainer.args.per_device_train_batch_size == 1
    assert trainer.args.train_sampling_strategy == "random"
    assert isinstance(sampler, RandomSampler)
    assert first["input_ids"].shape[0] == 1
    # the collator builds the KL sequence: the row's prompt, then its partner's completion
    prompt = first["input_ids"][0][first["attention_mask"][0].bool()].tolist()
    kl = first["KL_input_ids"][0][first["KL_attention_mask"][0].bool()].tolist()
    row = next(r for r in prepared if prompt == r["prompt_ids"] + r["completion_ids"])
    assert kl == row["prompt_ids"] + row["KL_completion_ids"]
