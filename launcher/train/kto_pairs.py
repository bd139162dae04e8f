"""KTO's KL completions paired across the data, as LLaMA-Factory pairs them
(train.kto_kl_pairing=previous_row), so that one row per micro-batch trains.

KTO's KL term scores each row's prompt with a completion that is not its own. TRL's KTOTrainer
(trl/trainer/kto_trainer.py, `_prepare_dataset`) rotates the completions by one inside chunks of
`per_device_train_batch_size` rows (a batched `Dataset.map`), trains in sequential order so that
a chunk is a micro-batch, and refuses one row per micro-batch (the row would be its own partner)
and any shuffling. LLaMA-Factory (src/llamafactory/data/processor/feedback.py,
`FeedbackDatasetProcessor.preprocess_dataset`) rotates by one inside each batch of its
preprocessing map (`preprocessing_batch_size` 1000 rows in each of `preprocessing_num_workers`
contiguous shards, as `Dataset.map(num_proc=...)` splits them), keeps the partner in the row and
lets the Trainer shuffle the rows.

Here the same map runs over TRL's tokenized rows: batches of 1000 rows in data.num_proc shards,
`completion_ids` rotated by one into `KL_completion_ids` (each row's partner is the previous row;
the first row of a batch takes the batch's last). Every rank builds the same pairs and every row
carries its partner, so the rows can be drawn one at a time, in any order and split over any
number of ranks; the plan asks for the Trainer's random order (launcher/config/methods.py
kto_order), as LLaMA-Factory trains.
"""

from __future__ import annotations

import copy
from typing import Any

# LLaMA-Factory's DataArguments.preprocessing_batch_size default: the rows one rotation spans
PREPROCESSING_BATCH = 1000


def previous_row_kto_trainer() -> type:
    """TRL's KTOTrainer, each row's KL completion the previous row's (LLaMA-Factory's rule)."""
    import datasets
    import trl
    from trl.trainer.utils import global_then_local_main_first

    class PreviousRowKTOTrainer(trl.KTOTrainer):
        def __init__(self, *, args: Any, **parts: Any) -> None:
            # TRL checks for two or more rows per micro-batch and sequential order before it
            # prepares the data: both guard its own pairing, which _prepare_dataset replaces.
            # The checks see values that pass them; everything after sees the recipe's.
            recipe = args.per_device_train_batch_size, args.train_sampling_strategy
            args.per_device_train_batch_size = max(2, recipe[0])
            args.train_sampling_strategy = "sequential"
            try:
                super().__init__(args=args, **parts)
            finally:
                args.per_device_train_batch_size, args.train_sampling_strategy = recipe
            self._train_batch_size = args.train_batch_size  # Trainer.__init__ read it
            if self.is_deepspeed_enabled:  # Trainer.__init__ filled DeepSpeed's micro-batch
                from transformers.integrations.deepspeed import propagate_args_to_deepspeed

                propagate_args_to_deepspeed(self.accelerator, args)

        def _prepare_dataset(
            self, dataset: Any, processing_class: Any, args: Any, dataset_name: str
        ) -> Any:
            # paired before TRL's length filter, as LLaMA-Factory pairs the rows it was given
            limit = args.max_length
            whole = copy.copy(args)
            whole.max_length = None
            dataset = super()._prepare_dataset(dataset, processing_class, whole, dataset_name)
            kwargs: dict[str, Any] = {}
            if isinstance(dataset, datasets.Dataset):  # an IterableDataset has no processes
                kwargs = {"num_proc": args.dataset_num_proc}
            with global_then_local_main_first():  # the first process writes the cache
                if self.calculate_KL:
                    dataset = dataset.map(
                        previous_row_completions,
                        batched=True,
                        batch_size=PREPROCESSING_BATCH,
                        **kwargs,
                    )
                if limit is not None:  # TRL's own filter: a prompt filling max_length
                    dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < limit, **kwargs)
            return dataset

    return PreviousRowKTOTrainer


def previous_row_completions(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A batch's KL completions: row i takes row i-1's completion, the first row the last's."""
    completions = batch["completion_ids"]
    return {"KL_completion_ids": completions[-1:] + completions[:-1]}
