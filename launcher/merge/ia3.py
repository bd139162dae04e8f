"""IA3 for the streaming merge: learned scales folded into the weights they scale.

peft's IA3 multiplies a linear's output by l (one value per output feature), or for a
feedforward module (the MLP's down projection) its input (one per input feature). Merged
(peft's IA3 Linear.merge): W' = W * l, broadcast over rows (l is out x 1) or columns (l is
1 x in; transposed for fan_in_fan_out), and for an output-scaled layer with a bias b' = b * l.
The adapter binds to the base like LoRA's (launcher/merge/lora.py `bind`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launcher.errors import RunError

_IA3_KEY = re.compile(r"^(?P<mod>.+)\.ia3_l(\.weight)?$")


@dataclass
class Ia3Weight:
    """One IA3-scaled module: W' = W * l."""

    module: str
    scale: torch.Tensor  # (out, 1), or (1, in) for a feedforward module
    feedforward: bool
    fan_in_fan_out: bool = False

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """weight (fp32, modified in place) scaled by l."""
        scale = self.scale.float()
        weight.mul_(scale.t() if self.fan_in_fan_out else scale)
        return weight

    def changes_bias(self, base_has_bias: bool) -> bool:
        """An output scale scales the bias too; an input scale leaves it."""
        return base_has_bias and not self.feedforward

    def bias_of(self, bias: torch.Tensor) -> torch.Tensor:
        return bias.float() * self.scale.float().reshape(bias.shape)


def load_ia3(cfg: dict[str, Any], weights: Path) -> Any:
    """An IA3 adapter's scales, as a merge Adapter (launcher/merge/lora.py)."""
    from safetensors.torch import load_file

    from launcher.merge.lora import PEFT_PREFIX, Adapter

    feedforward = cfg.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        feedforward = [feedforward]
    found: dict[str, Ia3Weight] = {}
    replace: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(weights)).items():
        if not key.startswith(PEFT_PREFIX):
            raise RunError(f"{weights}: unexpected key {key!r} (not under {PEFT_PREFIX!r})")
        name = key.removeprefix(PEFT_PREFIX)
        match = _IA3_KEY.match(name)
        if match is None:
            if "ia3_" in name:
                raise RunError(f"{weights}: unsupported adapter tensor {key!r}")
            replace[name] = tensor  # modules_to_save
            continue
        mod = match["mod"]
        is_ff = any(re.fullmatch(rf"(.*\.)?{re.escape(f)}", mod) for f in feedforward)
        if is_ff != (tensor.shape[0] == 1 and tensor.dim() == 2):
            raise RunError(
                f"{weights}: {key} has shape {tuple(tensor.shape)}, which does not match "
                f"feedforward_modules={feedforward}"
            )
        found[mod] = Ia3Weight(mod, tensor, is_ff, bool(cfg.get("fan_in_fan_out")))
    return Adapter(found, replace)
