"""Fixtures for the serve tests: a fake run directory and ONE shared vLLM server.

Starting vLLM costs 30-60 s on a 2-core CPU host, so every test that only talks to a server
shares the session's `server`: the run's base (a tiny llama vLLM's CPU attention accepts) as
"base" plus a random LoRA adapter RUN_DIR/final as the module named after the run, with an
API key required.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from serve_models import make_run_dir, random_adapter, servable_tiny, write_metrics

from launcher.rundir import RunDir

API_KEY_ENV = "TL_SERVE_TEST_KEY"
API_KEY = "tl-test-" + secrets.token_hex(12)


RUN_OVERRIDES = [
    "eval.max_examples=6",
    "eval.few_shot=2",
    "eval.concurrency=4",
    "eval.max_tokens=4",
    f"serve.api_key_env={API_KEY_ENV}",
    "serve.health_timeout_s=400",
    # lm-eval and the parity gate have their own tests (test_eval_gates.py): ~20 s each run
    "eval.lm_eval_tasks=[]",
    "eval.parity_examples=2",
]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return servable_tiny(tmp_path_factory.mktemp("models") / "base")


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """RUN_DIR with plan.json, base/ (trained tiny), final/ (random LoRA), metrics.jsonl."""
    run = make_run_dir(tmp_path_factory.mktemp("runs") / "qs", RUN_OVERRIDES)
    shutil.copytree(tiny_base, run / "base")
    random_adapter(RunDir(run).base, RunDir(run).final)
    write_metrics(run)
    return run


@pytest.fixture(scope="session")
def api_key() -> Iterator[str]:
    old = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = API_KEY
    yield API_KEY
    if old is None:
        os.environ.pop(API_KEY_ENV, None)
    else:
        os.environ[API_KEY_ENV] = old


@pytest.fixture(scope="session")
def server(serve_run: Path, api_key: str) -> Iterator[object]:
    from serve.vllm import VLLMServer, spec_for_run

    # the context eval_run would give its own server (few-shot prompts exceed max_seq_len 64)
    with VLLMServer(spec_for_run(serve_run, mode="lora", port=0, max_model_len=256)) as srv:
        print(f"\nshared vLLM server healthy after {srv.startup_s:.1f} s", file=sys.stderr)
        yield srv
