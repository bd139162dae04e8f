"""The tracking rules (train.trackers and the tracking section), run from the one list in
rules.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.errors import Problem

if TYPE_CHECKING:
    from launcher.config.rules import Candidate

# tracking.* settings -> the tracker that reads them
SETTING_OF = {
    "wandb_mode": ("wandb",),
    "wandb_entity": ("wandb",),
    "mlflow_tracking_uri": ("mlflow",),
    "project": ("wandb", "mlflow"),
}


def tracking_settings_need_their_tracker(c: Candidate) -> list[Problem]:
    """A setting for a tracker the run does not report to would be ignored, silently."""
    trackers, tracking = c.recipe.train.trackers, c.recipe.tracking
    return [
        Problem(
            f"tracking.{name}",
            f"a setting of {' or '.join(SETTING_OF[name])}, which train.trackers "
            f"{list(trackers)} does not name",
            f"add {SETTING_OF[name][0]} to train.trackers, or remove it",
            getattr(tracking, name),
        )
        for name in SETTING_OF
        if getattr(tracking, name) != type(tracking).model_fields[name].default
        and not set(SETTING_OF[name]) & set(trackers)
    ]


def wandb_online_needs_the_api_key(c: Candidate) -> list[Problem]:
    recipe = c.recipe
    if "wandb" not in recipe.train.trackers or recipe.tracking.wandb_mode != "online":
        return []
    if "WANDB_API_KEY" in recipe.secrets:
        return []
    return [
        Problem(
            "tracking.wandb_mode",
            "W&B online needs WANDB_API_KEY, and it is not among the recipe's secrets",
            "add WANDB_API_KEY to secrets (and export it in the submitting shell), or use "
            "wandb_mode=offline",
            "online",
        )
    ]


def mlflow_store_is_a_database_or_server(c: Candidate) -> list[Problem]:
    """MLflow 3 refuses its file store (./mlruns, file:...): a run would fail on its first
    log, after the processes started."""
    uri = c.recipe.tracking.mlflow_tracking_uri
    if uri is None or ("://" in uri and not uri.startswith("file:")):
        return []
    return [
        Problem(
            "tracking.mlflow_tracking_uri",
            "a file store: MLflow 3 keeps it in maintenance mode and refuses it",
            "use a database (sqlite:///path/mlflow.db) or a server (http://host:5000), or remove "
            "it (default: sqlite:///RUN_DIR/mlflow.db)",
            uri,
        )
    ]
