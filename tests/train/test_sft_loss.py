"""The SFT loss tune-launch trains on (transformers' Trainer.compute_loss: the model's own
cross-entropy on the labels TRL's collator built) is the loss TRL's SFTTrainer would have
computed with its fused LM head, on the same batches: with and without completion-only loss.
launcher/train/callbacks.py takes the former because it is ~30% faster per step (docs/benchmarks.md).

In-process, one process, a tiny Llama and the quickstart data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.train

DATA = REPO / "recipes" / "data" / "quickstart_train.jsonl"


@pytest.mark.parametrize("completion_only", [True, False])
def test_model_loss_equals_trl_fused_loss(tmp_path: Path, completion_only: bool) -> None:
    import datasets
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    from launcher.config.recipe import DataConfig
    from launcher.data.formats import get_format
    from launcher.rundir import RunDir
    from launcher.tiny import write_tiny
    from launcher.train import callbacks

    base = write_tiny("llama", tmp_path / "base", corpus_files=[str(DATA)])
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    data = DataConfig(train=str(DATA), format="alpaca", max_seq_len=64)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:32]]
    convert = get_format(data.format).convert
    train = datasets.Dataset.from_list([convert(r, data, None) for r in rows])
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_length=64,
        completion_only_loss=completion_only,
        report_to=[],
        use_cpu=True,
    )
    hooks = callbacks.RunHooks(
        run=RunDir(tmp_path), nan_policy="stop", keep_last=1, rank=0, model_loss=True
    )
    trainer = callbacks.trainer_class(SFTTrainer, hooks)(
        model=model, args=args, train_dataset=train, processing_class=tokenizer
    )
    trainer.model.train()
    compared = 0
    for batch in trainer.get_train_dataloader():
        batch = trainer._prepare_inputs(batch)
        with torch.no_grad():
            ours = trainer.compute_loss(trainer.model, dict(batch))
            trl = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
        assert torch.isfinite(ours) and ours.item() > 0.1
        assert abs(ours.item() - trl.item()) <= 1e-5 * max(1.0, abs(trl.item())), (ours, trl)
        compared += 1
    assert compared == 4
    # our override counted the batches' non-padding tokens, without any collective
    assert trainer._tokens is not None and int(trainer._tokens) > 32 * 10
