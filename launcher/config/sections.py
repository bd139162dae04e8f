"""What every recipe section shares: closed (`extra="forbid"`), frozen, defaults validated;
and the small literal types several sections use."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Dtype = Literal["bf16", "fp16", "fp32"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
