"""What the code trusts: no remote code unless the recipe says so, weights from safetensors,
no unsafe deserialisation.

- A source scan (ast) of launcher/, cluster/ and serve/: no `trust_remote_code=True`
  literal (every from_pretrained either leaves the default False or passes the recipe's
  model.trust_remote_code); every torch.load passes weights_only=True; no yaml.load without
  a safe loader; no eval/exec/os.system/shell=True; pickle only where listed (submitit's own
  result files, which its job wrote).
- launcher.train.model.load_model passes trust_remote_code from the recipe (False by default).
- A model directory with a poisoned pytorch_model.bin (a pickle that runs `touch MARKER`):
  next to model.safetensors the safetensors file is read; alone it is refused; the payload
  never runs.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from launcher.config.plan import ClusterFacts, resolve
from launcher.config.recipe import load_recipe, localize

from .conftest import QUICKSTART, REPO

pytestmark = [pytest.mark.timeout(300)]

SOURCES = sorted(
    p for folder in ("launcher", "cluster", "serve") for p in (REPO / folder).rglob("*.py")
)
# (file, call) pairs that may unpickle: submitit's result pickles, written by its own job
PICKLE_ALLOWED = {("cluster/chain.py", "pickle_load")}


def _calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        base = func.value
        prefix = base.id if isinstance(base, ast.Name) else "<expr>"
        return f"{prefix}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_source_scan_trust_and_deserialisation(record_property) -> None:
    record_property(
        "fault_class", "trust: remote code, torch.load, pickle, yaml, shell (source scan)"
    )
    problems = []
    for path in SOURCES:
        rel = str(path.relative_to(REPO))
        for call in _calls(path):
            name = _name(call)
            where = f"{rel}:{call.lineno} {name}"
            trust = _kw(call, "trust_remote_code")
            if isinstance(trust, ast.Constant) and trust.value is True:
                problems.append(f"{where}: trust_remote_code=True")
            if trust is not None and not isinstance(trust, ast.Constant):
                text = ast.unparse(trust)
                if "trust_remote_code" not in text:
                    problems.append(f"{where}: trust_remote_code={text} (not the recipe's)")
            if name == "torch.load":
                weights_only = _kw(call, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if (
                name.split(".")[-1] in ("load", "loads", "pickle_load")
                and (name.startswith(("pickle", "dill", "cloudpickle")) or name == "pickle_load")
                and (rel, name) not in PICKLE_ALLOWED
            ):
                problems.append(f"{where}: unpickling")
            if name == "yaml.load":
                loader = _kw(call, "Loader")
                text = ast.unparse(loader) if loader is not None else ""
                if "Safe" not in text:
                    problems.append(f"{where}: yaml.load with Loader={text or 'default'}")
            if name in ("eval", "exec", "os.system", "os.popen", "yaml.unsafe_load"):
                problems.append(f"{where}: {name}")
            shell = _kw(call, "shell")
            if isinstance(shell, ast.Constant) and shell.value is True:
                problems.append(f"{where}: shell=True")
    assert not problems, "\n".join(problems)


def _plan(model_dir: Path, *overrides: str) -> Any:
    recipe = load_recipe(QUICKSTART, [f"model.name_or_path={model_dir}", *overrides])
    recipe = localize(recipe, QUICKSTART.parent)
    return resolve(
        recipe, ClusterFacts(run_dir=str(model_dir.parent / "run"), python=sys.executable)
    )


class _Stub:
    def __init__(self) -> None:
        self.config = type("Config", (), {})()


@pytest.mark.parametrize("trust", [None, True])
def test_load_model_passes_trust_remote_code_from_the_recipe(
    trust: bool | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_property
) -> None:
    record_property("fault_class", "trust: trust_remote_code off unless the recipe says so")
    import transformers

    from launcher.train import model as modeling

    seen: dict[str, Any] = {}

    def fake(path: str, **kwargs: Any) -> _Stub:
        seen.update(kwargs, path=path)
        return _Stub()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    (tmp_path / "m").mkdir()
    overrides = [] if trust is None else ["model.trust_remote_code=true"]
    modeling.load_model(_plan(tmp_path / "m", *overrides))
    assert seen["trust_remote_code"] is bool(trust)
    assert seen.get("weights_only", True) is True and seen.get("use_safetensors") is not False


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from launcher.tiny import write_tiny

    return Path(write_tiny("llama", tmp_path_factory.mktemp("tiny") / "model"))


def _poisoned_copy(tiny_model: Path, where: Path, keep_safetensors: bool) -> tuple[Path, Path]:
    import shutil

    import torch

    model_dir = where / "model"
    shutil.copytree(tiny_model, model_dir)
    marker = where / "PWNED"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, model_dir / "pytorch_model.bin")
    if not keep_safetensors:
        (model_dir / "model.safetensors").unlink()
    return model_dir, marker


def test_weights_come_from_safetensors_next_to_a_poisoned_bin(
    tiny_model: Path, tmp_path: Path, record_property
) -> None:
    record_property("fault_class", "trust: poisoned pytorch_model.bin beside model.safetensors")
    import torch
    from safetensors.torch import load_file

    from launcher.train import model as modeling

    model_dir, marker = _poisoned_copy(tiny_model, tmp_path, keep_safetensors=True)
    net = modeling.load_model(_plan(model_dir, "model.dtype=fp32"))
    expected = load_file(str(model_dir / "model.safetensors"))
    name = next(k for k in expected if k.endswith("embed_tokens.weight"))
    assert torch.equal(net.state_dict()[name], expected[name])
    assert not marker.exists()


def test_a_poisoned_bin_alone_is_refused_without_running(
    tiny_model: Path, tmp_path: Path, record_property
) -> None:
    record_property("fault_class", "trust: poisoned pytorch_model.bin only (weights_only)")
    from launcher.train import model as modeling

    model_dir, marker = _poisoned_copy(tiny_model, tmp_path, keep_safetensors=False)
    with pytest.raises(Exception) as info:
        modeling.load_model(_plan(model_dir, "model.dtype=fp32"))
    assert not marker.exists(), "the pickle payload ran"
    assert "weights_only" in str(info.value) or "Unsupported global" in str(info.value), info.value
