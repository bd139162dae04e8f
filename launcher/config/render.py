"""Plan -> concrete configs: DeepSpeed JSON, accelerate YAML, per-node launch argv/env.

Pure functions returning data. What they return is written to the run directory and is
exactly what runs: no `"auto"` is left in the DeepSpeed config, except the three bucket sizes
when the model's shape is not known offline (they depend on its hidden size, which is never
guessed; the Trainer's DeepSpeed integration resolves them from the loaded model).
Per-node values that only exist inside a SLURM step (`{node_rank}`, `{master_addr}`,
`{master_port}`) stay as placeholders and are filled by `cluster/rank_env.py` on the node.
"""

from __future__ import annotations

import shlex
from typing import Any

from launcher.config.arch import ModelShape
from launcher.config.schema_fsdp import FSDP1_ONLY, FsdpConfig
from launcher.config.strategies import get_strategy
from launcher.rundir import RunDir

NODE_RANK, MASTER_ADDR, MASTER_PORT = "{node_rank}", "{master_addr}", "{master_port}"


def render_deepspeed(
    *,
    strategy: str,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    max_grad_norm: float,
    precision: str,
    offload_optimizer: bool,
    offload_params: bool,
    shape: ModelShape | None,
    overlap_comm: bool = True,
) -> dict[str, Any] | None:
    """The DeepSpeed config for zero2/zero3, or None for other strategies."""
    stage = get_strategy(strategy).zero_stage
    if stage is None:
        return None
    # bucket sizes follow the hidden size; when the shape is unknown offline they stay "auto",
    # which the Trainer's DeepSpeed integration fills from the loaded model's config
    h = shape.hidden_size if shape else 0

    def sized(value: float) -> int | str:
        return int(value) if shape else "auto"

    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": sized(h * h),
    }
    if stage == 2:
        zero |= {
            "allgather_partitions": True,
            "allgather_bucket_size": int(5e8),
            "reduce_scatter": True,
        }
    else:
        zero |= {
            "sub_group_size": int(1e9),
            "stage3_prefetch_bucket_size": sized(0.9 * h * h),
            "stage3_param_persistence_threshold": sized(10 * h),
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params and get_strategy(strategy).offloads_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": zero,
        # the Trainer builds the optimizer (8-bit/paged ones included); DeepSpeed wraps it
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
    return config


def render_fsdp(
    *, layer_class: str, offload_params: bool, fsdp: FsdpConfig | None = None
) -> dict[str, Any]:
    """FSDP2 for distributed.strategy=fsdp: the TrainingArguments keywords (`fsdp`,
    `fsdp_config` in transformers' key names). The rank passes them to its TrainingArguments
    under either launcher, and accelerate.yaml spells the same settings its own way.

    Full state dicts: the Trainer saves the final model (the adapter the merge reads) only
    with FULL_STATE_DICT; activation checkpointing stays train.gradient_checkpointing's, in
    the TrainingArguments (transformers refuses both switched on)."""
    fsdp = fsdp or FsdpConfig()
    config: dict[str, Any] = {
        "version": fsdp.version,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": [layer_class],
        # FSDP2: a bool (full_shard reshards after forward); FSDP1: the strategy's name
        "reshard_after_forward": fsdp.sharding == "full_shard"
        if fsdp.version == 2
        else fsdp.sharding,
        "cpu_offload": offload_params,
        "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": False,
    }
    if fsdp.version == 1:  # rules: these settings only with FSDP1
        config |= {name: getattr(fsdp, name) for name in FSDP1_ONLY}
    return {"fsdp": True, "fsdp_config": config}


def _accelerate_fsdp(fsdp_config: dict[str, Any]) -> dict[str, Any]:
    """accelerate's `fsdp_config` section: the same settings in `accelerate config`'s keys."""
    renamed = {"cpu_offload": "offload_params"}
    section = {f"fsdp_{renamed.get(k, k)}": v for k, v in fsdp_config.items()}
    section["fsdp_transformer_layer_cls_to_wrap"] = ",".join(
        fsdp_config["transformer_layer_cls_to_wrap"]
    )
    return section


def render_accelerate(
    *,
    strategy: str,
    nodes: int,
    gpus_per_node: int,
    precision: str,
    on_gpu: bool,
    deepspeed_path: str | None,
    fsdp: dict[str, Any] | None,
) -> dict[str, Any]:
    """accelerate's config file (the keys `accelerate config` writes); `fsdp` is
    render_fsdp's result for the fsdp strategy."""
    world = nodes * gpus_per_node
    if get_strategy(strategy).deepspeed:
        distributed_type = "DEEPSPEED"
    elif fsdp:
        distributed_type = "FSDP"
    elif world == 1:
        distributed_type = "NO"
    else:
        distributed_type = "MULTI_GPU" if on_gpu else "MULTI_CPU"
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": distributed_type,
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no"),
        "num_machines": nodes,
        "num_processes": world,
        "rdzv_backend": "static" if nodes > 1 else "no",
        "same_network": True,
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
        "use_cpu": not on_gpu,
    }
    if nodes > 1:
        config["main_process_ip"] = MASTER_ADDR
        config["main_process_port"] = MASTER_PORT
    if distributed_type == "DEEPSPEED":
        config["deepspeed_config"] = {
            "deepspeed_config_file": deepspeed_path,
            "deepspeed_multinode_launcher": "standard",
            "zero3_init_flag": get_strategy(strategy).shards_parameters,
        }
        # with a DeepSpeed file, precision lives in the file
        config.pop("mixed_precision")
    if fsdp:
        config["fsdp_config"] = _accelerate_fsdp(fsdp["fsdp_config"])
    return config


def render_launch(
    *,
    launcher: str,
    python: str,
    nodes: int,
    gpus_per_node: int,
    run_dir: str,
    accelerate_path: str,
) -> list[str]:
    """The argv each node runs (placeholders filled per node for multi-node jobs)."""
    entry = ["-m", "launcher.train", run_dir]
    if launcher == "accelerate":
        argv = [python, "-m", "accelerate.commands.launch", "--config_file", accelerate_path]
        if nodes > 1:
            argv += [
                "--machine_rank",
                NODE_RANK,
                "--main_process_ip",
                MASTER_ADDR,
                "--main_process_port",
                MASTER_PORT,
            ]
        else:
            argv += ["--main_process_port", "0"]
        return [*argv, *entry]
    argv = [python, "-m", "torch.distributed.run", f"--nproc-per-node={gpus_per_node}"]
    if nodes == 1:
        argv += ["--standalone", "--nnodes=1"]
    else:
        argv += [
            f"--nnodes={nodes}",
            f"--node-rank={NODE_RANK}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={MASTER_ADDR}:{MASTER_PORT}",
            "--rdzv-id={rdzv_id}",
        ]
    argv += ["--max-restarts=0", "--monitor-interval=1"]
    return [*argv, *entry]


def render_env(
    *,
    on_gpu: bool,
    socket_ifname: str | None,
    ib_disable: bool | None,
    user_env: dict[str, str],
    threads_per_rank: int,
) -> dict[str, str]:
    """Plain (non-secret) variables every rank gets. Plan values (the collective timeout,
    batch sizes) are not among them: the rank reads those from plan.json."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads_per_rank),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    if socket_ifname:
        env["NCCL_SOCKET_IFNAME"] = socket_ifname
        env["GLOO_SOCKET_IFNAME"] = socket_ifname
    if ib_disable is not None:
        env["NCCL_IB_DISABLE"] = "1" if ib_disable else "0"
    env.update(user_env)
    return env


def render_tracking(
    *,
    trackers: list[str],
    name: str,
    run_dir: str,
    project: str | None,
    wandb_mode: str,
    wandb_entity: str | None,
    mlflow_tracking_uri: str | None,
) -> dict[str, str]:
    """Where each tracker of train.trackers writes, and under which names: the settings the
    rank hands to the libraries (launcher/train/tracking.py). Secrets are not among them."""
    run = RunDir(run_dir)
    out: dict[str, str] = {}
    if "tensorboard" in trackers:
        out["tensorboard_dir"] = str(run.tensorboard)
    if "wandb" in trackers:
        out |= {"wandb_project": project or name, "wandb_mode": wandb_mode}
        out["wandb_dir"] = str(run.path)  # W&B adds its wandb/ folder (RunDir.wandb)
        if wandb_entity:
            out["wandb_entity"] = wandb_entity
    if "mlflow" in trackers:
        out["mlflow_tracking_uri"] = mlflow_tracking_uri or f"sqlite:///{run.mlflow_db}"
        out["mlflow_experiment"] = project or name
    return out


def render_launch_script(
    name: str, env: dict[str, str], secrets: list[str], argv: list[str]
) -> str:
    """RUN_DIR/launch.sh: the node's command with its environment (secrets by name only)."""
    lines = [
        "#!/usr/bin/env bash",
        f"# tune-launch run {name}: what each node runs",
        "set -euo pipefail",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    if secrets:
        lines.append(f"# secrets passed from the submitting environment: {' '.join(secrets)}")
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"
