"""The real vLLM (CPU build) behind the shared session server: OpenAI API, LoRA, contract,
API key, bind address."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

QUESTION = [
    {"role": "user", "content": "Is this review positive or negative?\n\nthe food was great."}
]


def _client(server, api_key):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=server.url, api_key=api_key, timeout=300, max_retries=0)


def test_openai_client_completions_and_chat(server, api_key, serve_run: Path) -> None:
    client = _client(server, api_key)
    names = {m.id for m in client.models.list().data}
    assert names == {"base", "qs"}
    done = client.completions.create(
        model="base",
        prompt="the food was",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},  # the trained tiny model would stop at once
    )
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
    assert done.choices[0].text
    chat = client.chat.completions.create(
        model="base", messages=QUESTION, max_tokens=8, temperature=0
    )
    # the tiny base was trained on this task: a label, then EOS
    assert chat.choices[0].message.content in ("positive", "negative")
    assert chat.choices[0].finish_reason == "stop"


def test_lora_module_answers_differently(server, api_key) -> None:
    client = _client(server, api_key)
    answers = {
        name: client.chat.completions.create(
            model=name, messages=QUESTION, max_tokens=8, temperature=0
        )
        .choices[0]
        .message.content
        for name in ("base", "qs")
    }
    assert answers["base"] != answers["qs"], answers


def test_contract_passes_on_tiny_model(server, api_key, serve_run: Path) -> None:
    from serve.vllm import check_contract

    found = check_contract(server.base_url, "base", serve_run / "base", api_key=api_key)
    assert found["finish_reason"] == "stop"
    assert found["text"] in ("positive", "negative")


def test_contract_reports_a_template_mismatch(server, api_key, serve_run: Path, tmp_path) -> None:
    from launcher.errors import RunError
    from launcher.rundir import RunDir
    from serve.vllm import check_contract

    trained = tmp_path / "trained"
    shutil.copytree(RunDir(serve_run).final, trained)
    contract = json.loads(RunDir.contract_file(trained).read_text())
    contract["chat_template"] = contract["chat_template"].replace("<|end|>", "</s>")
    RunDir.contract_file(trained).write_text(json.dumps(contract))
    with pytest.raises(RunError, match=r"formats chats differently.*first difference at token"):
        check_contract(server.base_url, "base", trained, api_key=api_key)


def test_api_key_required_and_never_logged(server, api_key) -> None:
    import httpx
    import psutil

    assert httpx.get(f"{server.url}/models", timeout=30).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert httpx.get(f"{server.url}/models", headers=bad, timeout=30).status_code == 401
    good = {"Authorization": f"Bearer {api_key}"}
    assert httpx.get(f"{server.url}/models", headers=good, timeout=30).status_code == 200
    assert api_key not in server.log_path.read_text(errors="replace")
    for pid in server.spawned:
        try:
            assert api_key not in " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue


def test_binds_localhost_by_default(server) -> None:
    import psutil

    assert server.spec.host == "127.0.0.1"
    listening = []
    for pid in server.spawned:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        listening += [
            c for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port
        ]
    assert listening, "the server listens on its port"
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
