"""The trackers' settings as the libraries read them: transformers' TensorBoard, W&B and
MLflow callbacks take their folders, projects and URIs from environment variables only, so the
rank sets those from plan.json (`plan.tracking`, resolved by launcher/config/render.py) before
the trainer is built. The plan's values win over the submitting shell's; secrets such as
WANDB_API_KEY reach the rank through the environment (recipe.secrets), never through here."""

from __future__ import annotations

import os

from launcher.config.plan import Plan

# plan.tracking key -> the variable the library reads
VARIABLES = {
    "tensorboard_dir": "TENSORBOARD_LOGGING_DIR",
    "wandb_project": "WANDB_PROJECT",
    "wandb_mode": "WANDB_MODE",
    "wandb_dir": "WANDB_DIR",
    "wandb_entity": "WANDB_ENTITY",
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
    "mlflow_experiment": "MLFLOW_EXPERIMENT_NAME",
}


def tracker_env(plan: Plan) -> dict[str, str]:
    """The variables the chosen trackers' libraries read, from the plan."""
    env = {VARIABLES[key]: value for key, value in plan.tracking.items()}
    if "wandb_project" in plan.tracking:
        env["WANDB_LOG_MODEL"] = "false"  # checkpoints stay in RUN_DIR, not in W&B artifacts
    return env


def apply(plan: Plan) -> None:
    os.environ.update(tracker_env(plan))
