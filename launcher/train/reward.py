"""A reward model's pairs cut to data.max_seq_len, as the recipe says, never dropped.

TRL's RewardTrainer tokenizes each pair (prompt + chosen, prompt + rejected) and then *drops*
every pair with a side longer than `max_length`, without a word in the run's data report;
data.max_seq_len promises truncation, which is also what axolotl's bradley_terry strategy and
LLaMA-Factory's pairwise data do (the start of the sequence kept). So the trainer tokenizes
whole pairs and then keeps each side's first max_seq_len tokens; the data report's
`over_long` count is the pairs cut.
"""

from __future__ import annotations

import copy
from typing import Any


def truncating_reward_trainer() -> type:
    """TRL's RewardTrainer, its dataset preparation truncating instead of filtering."""
    import trl

    class TruncatingRewardTrainer(trl.RewardTrainer):
        def _prepare_dataset(
            self, dataset: Any, processing_class: Any, args: Any, dataset_name: str
        ) -> Any:
            limit = args.max_length
            whole = copy.copy(args)  # the same arguments, without TRL's length filter
            whole.max_length = None
            dataset = super()._prepare_dataset(dataset, processing_class, whole, dataset_name)
            if limit is None:
                return dataset
            return dataset.map(
                _keep_start,
                fn_kwargs={"limit": limit},
                num_proc=args.dataset_num_proc,
                desc=f"Truncating {dataset_name} pairs to {limit} tokens",
            )

    return TruncatingRewardTrainer


def _keep_start(example: dict[str, Any], limit: int) -> dict[str, Any]:
    return {
        "chosen_ids": example["chosen_ids"][:limit],
        "rejected_ids": example["rejected_ids"][:limit],
    }
