"""The Ollama Modelfile written beside a GGUF: training's chat template and stop tokens.

Ollama's TEMPLATE is a Go template, not Jinja. Training's Jinja template is translated by
rendering it, not by parsing it: one message of each role with a sentinel content gives each
role's prefix and suffix, an empty conversation the preamble, and the generation prompt is what
`add_generation_prompt` adds. The translation is accepted only if those pieces reproduce the
Jinja rendering of a multi-turn conversation exactly; a template that is not a concatenation of
per-message pieces is refused rather than approximated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.errors import RunError

ROLES = ("system", "user", "assistant")
_SENTINEL = "\x00CONTENT\x00"
_CHECK = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
]


@dataclass(frozen=True)
class ChatPieces:
    preamble: str
    roles: dict[str, tuple[str, str]]  # role -> (prefix, suffix)
    generation_prompt: str


def _renderer(chat_template: str, contract: dict[str, Any]) -> Any:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _compile_jinja_template(chat_template)  # transformers' own Jinja environment
    specials = {k: contract.get(k) or "" for k in ("bos_token", "eos_token", "pad_token")}

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        try:
            return str(
                template.render(messages=messages, add_generation_prompt=generation, **specials)
            )
        except Exception as exc:  # the template's own raise_exception, or a Jinja error
            raise RunError(
                f"the chat template cannot be written as an Ollama TEMPLATE: rendering "
                f"{[m['role'] for m in messages]} failed: {exc}"
            ) from exc

    return render


def chat_pieces(chat_template: str, contract: dict[str, Any]) -> ChatPieces:
    """Training's template as preamble + per-role prefix/suffix + generation prompt."""
    render = _renderer(chat_template, contract)
    preamble = render([], False)
    roles: dict[str, tuple[str, str]] = {}
    for role in ROLES:
        one = render([{"role": role, "content": _SENTINEL}], False)
        body = one[len(preamble) :] if one.startswith(preamble) else None
        if body is None or body.count(_SENTINEL) != 1:
            raise RunError(f"the chat template does not render a lone {role} message as one turn")
        prefix, suffix = body.split(_SENTINEL)
        roles[role] = (prefix, suffix)
    user = [{"role": "user", "content": _SENTINEL}]
    without, with_gen = render(user, False), render(user, True)
    if not with_gen.startswith(without):
        raise RunError("the chat template's generation prompt is not appended to the turns")
    pieces = ChatPieces(preamble, roles, with_gen[len(without) :])
    expected = render(_CHECK, True)
    rebuilt = preamble + "".join(
        roles[m["role"]][0] + m["content"] + roles[m["role"]][1] for m in _CHECK
    )
    if rebuilt + pieces.generation_prompt != expected:
        raise RunError(
            "the chat template is not a concatenation of per-message turns, so it cannot be "
            f"written as an Ollama TEMPLATE; Jinja renders {expected!r}"
        )
    return pieces


def _literal(text: str) -> str:
    """Text inside a Go template (a literal `{{` would be read as an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: ChatPieces) -> str:
    """Ollama's TEMPLATE over .Messages. No `{{-` trimming: the turns' newlines are content."""
    branches = []
    for i, role in enumerate(ROLES):
        prefix, suffix = pieces.roles[role]
        head = "{{ if" if i == 0 else "{{ else if"
        branches.append(
            f'{head} eq .Role "{role}" }}}}{_literal(prefix)}{{{{ .Content }}}}{_literal(suffix)}'
        )
    body = "".join(branches) + "{{ end }}"
    return (
        f"{_literal(pieces.preamble)}{{{{ range .Messages }}}}{body}{{{{ end }}}}"
        f"{_literal(pieces.generation_prompt)}"
    )


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stop_tokens(contract: dict[str, Any], id_to_token: dict[int, str]) -> list[str]:
    """Training's EOS strings: eos_token, then every eos_token_ids entry, each once."""
    found: list[str] = []
    for tok in [
        contract.get("eos_token"),
        *(id_to_token.get(i) for i in contract.get("eos_token_ids") or []),
    ]:
        if tok and tok not in found:
            found.append(tok)
    return found


def render_modelfile(gguf_name: str, contract: dict[str, Any], stops: list[str]) -> str:
    """An Ollama Modelfile for `gguf_name` (beside it) from training's train_contract.json."""
    chat_template = contract.get("chat_template")
    if not chat_template:
        raise RunError("train_contract.json has no chat_template: Ollama needs one to chat")
    template = go_template(chat_pieces(chat_template, contract))
    if '"""' in template:
        raise RunError('the chat template contains """, which a Modelfile TEMPLATE cannot hold')
    lines = [
        "# Ollama Modelfile written by `tune-launch export --format gguf`:",
        "# training's chat template and EOS (train_contract.json), translated to Go template.",
        "#   ollama create NAME -f Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        *(f"PARAMETER stop {_quote(s)}" for s in stops),
    ]
    return "\n".join(lines) + "\n"
