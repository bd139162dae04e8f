"""The rank side of the FSDP2 check (scripts/gpu_fsdp.py): the rank's own code, with one
callback that says what the trainer really trains.

    <the plan's launch command, `-m launcher.train RUN_DIR` replaced by>
        scripts/gpu_fsdp_probe.py RUN_DIR OUT.json

It runs `launcher.train.entry.main([RUN_DIR])`, the code every rank of a multi-GPU run runs
(plan.json -> TrainingArguments with the plan's fsdp settings -> model -> TRL trainer ->
train -> final/), started by the same torchrun command with the same environment; the only
addition is a callback on the trainer. On rank 0 it records, once the trainer has prepared
the model (train begin) and again after the first optimizer step: how many of the plan's
decoder-layer modules there are and how many are FSDP2 modules (`FSDPModule`), whether the
root, the input embedding and the output layer are, how many parameters are sharded DTensors, and for QLoRA the storage dtype of the
packed 4-bit weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def describe(model: Any, layer_class: str) -> dict[str, Any]:
    """What FSDP2 did to `model`: wrapped layers, sharded parameters, 4-bit weights."""
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    layers = [m for m in model.modules() if any(c.__name__ == layer_class for c in type(m).__mro__)]
    four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    params = list(model.parameters())
    sharded = [p for p in params if isinstance(p, DTensor)]
    quant = [m.weight for m in four_bit]
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        "layer_class": layer_class,
        "layers": len(layers),
        "layers_wrapped": sum(isinstance(m, FSDPModule) for m in layers),
        "wrapped_layer_type": type(layers[0]).__name__ if layers else None,
        "root_wrapped": isinstance(model, FSDPModule),
        # accelerate's own units for the input embedding and the output layer (torchtune's
        # custom_sharded_layers)
        "embedding_wrapped": isinstance(embedding, FSDPModule),
        "output_wrapped": isinstance(output, FSDPModule),
        "params": len(params),
        "params_dtensor": len(sharded),
        "placements": sorted({str(p.placements) for p in sharded}),
        "linear4bit": len(four_bit),
        "quant_weight_dtypes": sorted({str(w.dtype) for w in quant}),
        "quant_weights_dtensor": sum(isinstance(w, DTensor) for w in quant),
        "trainable_dtypes": sorted({str(p.dtype) for p in params if p.requires_grad}),
        "device": str(params[0].device) if params else None,
        "world_size": torch.distributed.get_world_size()
        if torch.distributed.is_initialized()
        else 1,
    }


def probe_callback(out: Path, layer_class: str) -> Any:
    from transformers import TrainerCallback

    class WrapProbe(TrainerCallback):
        def __init__(self) -> None:
            self.record: dict[str, Any] = {}

        def _save(self, state: Any, key: str, model: Any) -> None:
            if not state.is_world_process_zero:
                return
            import torch

            self.record[key] = describe(model, layer_class)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            out.write_text(json.dumps(self.record, indent=2))

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._save(state, "at_train_begin", kw["model"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 1:
                self._save(state, "after_step_1", kw["model"])

    return WrapProbe()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: gpu_fsdp_probe.py RUN_DIR OUT.json", file=sys.stderr)
        return 2
    run_dir, out = argv
    from launcher.config.arch import ModelShape
    from launcher.rundir import RunDir
    from launcher.train import entry, trainers

    plan = RunDir(run_dir).load_plan()
    layer_class = ModelShape(**(plan.model_shape or {})).layer_class
    build = trainers.build_trainer

    def build_with_probe(*args: Any, **kwargs: Any) -> Any:
        trainer = build(*args, **kwargs)
        trainer.add_callback(probe_callback(Path(out), layer_class))
        return trainer

    # entry.train imports build_trainer from the module when it runs: it gets this one
    trainers.build_trainer = build_with_probe
    return entry.main([run_dir])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
