"""`tune-launch export`: the Ollama Modelfile rendered from training's chat template and EOS,
the converter's tokenizer rule, and the argument checks (exit 2, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.errors import RunError
from launcher.export.convert_gguf import gpt2_pre_tokenizer
from launcher.export.modelfile import chat_pieces, go_template, render_modelfile, stop_tokens

# the template and EOS of the quickstart's tokenizer (launcher/tiny.py), as train_contract.json
QUICKSTART = {
    "chat_template": "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    "eos_token": "<|end|>",
    "eos_token_id": 6,
    "eos_token_ids": [6, 2],
    "bos_token_id": 1,
}
CHATML = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' "
    "+ message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_modelfile_of_the_quickstart_template() -> None:
    stops = stop_tokens(QUICKSTART, {6: "<|end|>", 2: "</s>"})
    assert stops == ["<|end|>", "</s>"]
    text = render_modelfile("model-Q8_0.gguf", QUICKSTART, stops)
    assert "FROM ./model-Q8_0.gguf\n" in text
    assert (
        'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}<|system|>\n'
        "{{ .Content }}<|end|>\n"
        '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n'
        '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}<|end|>\n'
        '{{ end }}{{ end }}<|assistant|>\n"""\n'
    ) in text
    assert text.endswith('PARAMETER stop "<|end|>"\nPARAMETER stop "</s>"\n')


def _go_render(template: str, messages: list[dict[str, str]]) -> str:
    """Enough of Go's text/template to run what go_template writes (range / if-else on Role)."""
    head, rest = template.split("{{ range .Messages }}")
    body, tail = rest.rsplit("{{ end }}", 1)
    branches = {}
    for part in body.removesuffix("{{ end }}").split("{{ ")[1:]:
        if part.startswith(("if eq .Role", "else if eq .Role")):
            role = part.split('"')[1]
            branches[role] = part.split("}}", 1)[1]
        elif part.startswith(".Content }}"):
            last = list(branches)[-1]
            branches[last] += "{{ " + part
    out = head
    for m in messages:
        out += branches[m["role"]].replace("{{ .Content }}", m["content"])
    return out + tail


def test_ollama_template_reproduces_training_rendering() -> None:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    contract = {"chat_template": CHATML, "bos_token": "<s>"}
    pieces = chat_pieces(CHATML, contract)
    assert pieces.preamble == "<s>"
    assert pieces.roles["user"] == ("<|im_start|>user\n", "<|im_end|>\n")
    assert pieces.generation_prompt == "<|im_start|>assistant\n"
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ]
    jinja = _compile_jinja_template(CHATML).render(
        messages=convo, add_generation_prompt=True, bos_token="<s>"
    )
    assert _go_render(go_template(pieces), convo) == jinja


def test_template_that_is_not_per_message_is_refused() -> None:
    # Llama-2 style: roles must alternate, a lone assistant turn raises
    strict = (
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ message['content'] }}{% endfor %}"
    )
    with pytest.raises(RunError, match="Ollama TEMPLATE"):
        render_modelfile("m.gguf", {"chat_template": strict}, [])
    # the last message rendered differently from the others
    last = "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(RunError, match="not a concatenation"):
        chat_pieces(last, {})
    with pytest.raises(RunError, match="no chat_template"):
        render_modelfile("m.gguf", {"eos_token": "</s>"}, ["</s>"])


def test_go_template_escapes_literal_braces() -> None:
    pieces = chat_pieces(
        "{% for m in messages %}{{ '{{' }}{{ m['content'] }}{% endfor %}", {"bos_token": ""}
    )
    assert '{{ "{{" }}' in go_template(pieces)


@pytest.mark.parametrize(
    ("pre", "normalizer", "gpt2"),
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, None, True),
        ({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, None, False),
        ({"type": "Sequence", "pretokenizers": []}, None, False),
        ({"type": "ByteLevel", "use_regex": True}, {"type": "NFC"}, False),
    ],
)
def test_gpt2_pre_tokenizer_rule(
    tmp_path: Path, pre: dict, normalizer: dict | None, gpt2: bool
) -> None:
    spec = {"model": {"type": "BPE"}, "pre_tokenizer": pre, "normalizer": normalizer}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert gpt2_pre_tokenizer(tmp_path) is gpt2


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text("{}")
    return run


def test_unknown_format_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(_run_dir(tmp_path)), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "unknown export format" in err and "gguf, int4" in err and "onnx" in err
    assert "Traceback" not in err


def test_missing_format_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(_run_dir(tmp_path))]) == 2
    assert "--format" in capsys.readouterr().err


def test_run_without_merged_model_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path)
    assert main(["export", str(run), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "no complete merged model" in err and f"tune-launch merge {run}" in err
    assert not (run / "export").exists()
    # a merged/ that never completed (no COMPLETE marker) is no better
    (run / "merged").mkdir()
    (run / "merged" / "config.json").write_text("{}")
    assert main(["export", str(run), "--format", "int4"]) == 2


def test_not_a_run_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nowhere"), "--format", "gguf"]) == 2
    assert "no plan.json" in capsys.readouterr().err


def _merged_run(tmp_path: Path) -> Path:
    run = _run_dir(tmp_path)
    (run / "merged").mkdir()
    (run / "merged" / "config.json").write_text("{}")
    (run / "merged" / "COMPLETE").write_text("{}")
    return run


@pytest.mark.parametrize("ok", [True, False])
def test_validation_decides_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], ok: bool
) -> None:
    """A validated export is published (COMPLETE) in export/FORMAT; a failed one exits 1 and
    stays in its staging directory with validation.json, and merged/ is never written."""
    import launcher.export.reference as reference
    import launcher.export.run as export_run
    import serve.contract

    run = _merged_run(tmp_path)
    merged_files = sorted(p.name for p in (run / "merged").iterdir())
    monkeypatch.setattr(reference, "held_out_prompts", lambda run, model: [])
    monkeypatch.setattr(reference, "greedy_transformers", lambda model, prompts, eos: [])
    monkeypatch.setattr(serve.contract, "eos_ids", lambda model: [6])

    def exporter(*args: object) -> dict:
        staged = Path(str(args[2]))
        (staged / "model.gguf").write_bytes(b"GGUF")
        return {"ok": ok, "failed": [] if ok else ["Q8_0"]}

    monkeypatch.setattr(export_run, "_exporter", lambda fmt, rows: exporter)
    code = main(["export", str(run), "--format", "gguf"])
    published, staged = run / "export" / "gguf", run / "export" / ".gguf.tmp"
    if ok:
        assert code == 0
        assert (published / "COMPLETE").is_file() and (published / "model.gguf").is_file()
        assert json.loads((published / "validation.json").read_text())["format"] == "gguf"
        assert not staged.exists()
    else:
        assert code == 1
        assert not published.exists()
        assert json.loads((staged / "validation.json").read_text())["failed"] == ["Q8_0"]
        assert "Q8_0 disagreed with the merged model" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "merged").iterdir()) == merged_files


def test_calibration_rows_only_for_int4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _merged_run(tmp_path)
    assert main(["export", str(run), "--format", "gguf", "--calibration-rows", "64"]) == 2
    assert main(["export", str(run), "--format", "int4", "--calibration-rows", "0"]) == 2
    assert "--calibration-rows" in capsys.readouterr().err
