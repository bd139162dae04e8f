"""Conversations tokenized for the trainer in batches: launcher/data/turns.py's `input_ids` and
loss mask, with one tokenization of each conversation instead of one per turn boundary.

turns.tokenize_turns (the reference) finds where a trained assistant turn starts as the common
token prefix of the conversation and of its prompt rendered with the generation prompt (and
where a turn that is not the last ends, from the conversation rendered through it), so it
tokenizes every prefix again. Here each boundary text B is resolved from the conversation's own
tokenization where that is provably the same number:

- the fast tokenizer splits a text at its added tokens (special tokens, chat markers) before
  anything else, and normalizes, pre-tokenizes and tokenizes each piece between them on its
  own; so when the conversation F starts with B and no added token of F straddles len(B), the
  tokens of B up to its last added token (at character A) are F's tokens up to that token, and
  B's remaining tokens are those of the piece B[A:], which in a chat template is the constant
  text after the last marker (the generation prompt's "\\n", "assistant\\n"): it is tokenized
  once, after its marker (so that it is not the text's first piece, as in B), and cached;
- every other case (B not a prefix of F, an added token across the boundary, a tokenizer whose
  added tokens strip whitespace or match normalized text, offsets that do not spell the added
  token, truncation or padding set on the backend, split_special_tokens) tokenizes B whole,
  exactly as the reference does.

The boundary is then the common prefix of B's tokens and F's, as in the reference: the same
`input_ids` and `completion_mask` for every conversation (tests/unit/test_chat_tokens.py
compares them with turns.tokenize_turns for several templates and tokenizers).

Rendering uses the tokenizer's compiled chat template with the variables apply_chat_template
gives it (special tokens, messages, tools, documents, add_generation_prompt); its Jinja context
is built from a flat copy of the template's globals, which is where apply_chat_template spends
most of its time. The first conversation of every batch is also rendered by
apply_chat_template; on any difference every later render goes through it.
"""

from __future__ import annotations

from typing import Any

from launcher.data.turns import Message, TurnError, _common_prefix, trained_turns

Tokens = dict[str, list[int]]
TAIL_CACHE = 4096  # boundary tails kept per worker (a chat template has a handful)
TAIL_CHARS = 64  # longer tails are tokenized, not cached (a template without markers)


class ChatTokenizer:
    """A tokenizer's conversations as `input_ids` and trained-turn spans, a batch at a time.
    Picklable (it goes to the map workers); the compiled template, the backend and the caches
    are built in each worker on first use."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._ready = False

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "_ready": False}

    # ----------------------------------------------------------------------------------------
    # set-up (per worker)

    def _setup(self) -> None:
        tok = self.tokenizer
        self._template = None
        self._variables: dict[str, Any] = {}
        self._backend = getattr(tok, "backend_tokenizer", None)
        self._markers: dict[int, str] = {}
        self._anchored = False
        self._tails: dict[tuple[int, str], list[int] | None] = {}
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            template = _compile_jinja_template(tok.get_chat_template(None, None))
            self._globals = dict(template.globals)  # a ChainMap: flattened once
            self._variables = {**self._globals, **tok.special_tokens_map}
            self._template = template
        except Exception:  # an unusual tokenizer: apply_chat_template renders every text
            self._template = None
        if self._backend is not None:
            tok(["x"], add_special_tokens=False)  # the backend set as a call leaves it
            added = self._backend.get_added_tokens_decoder()  # what its split matches
            plain = all(
                not (t.lstrip or t.rstrip or t.single_word)
                and (not t.normalized or self._backend.normalizer is None)
                for t in added.values()
            )
            self._anchored = plain and not getattr(tok, "split_special_tokens", False)
            self._markers = {i: t.content for i, t in added.items() if t.content}
        self._ready = True

    # ----------------------------------------------------------------------------------------
    # rendering and encoding

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        if self._template is None:
            return str(
                self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=generation_prompt
                )
            )
        from jinja2.runtime import Context

        template = self._template
        env = template.environment
        variables = {**self._variables, "messages": messages, "tools": None,
                     "documents": None, "add_generation_prompt": generation_prompt}  # fmt: skip
        context = Context(env, variables, template.name, template.blocks, globals=self._globals)
        try:
            return str(env.concat(template.root_render_func(context)))
        except Exception:
            env.handle_exception()
            raise

    def _check_render(self, messages: list[Message]) -> None:
        """The compiled render against apply_chat_template on one conversation (both modes)."""
        if self._template is None:
            return
        for generation_prompt in (False, True):
            expected = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
            if self._render(messages, generation_prompt) != str(expected):
                self._template = None
                return

    def _backend_ready(self) -> bool:
        be = self._backend
        return (
            be is not None
            and be.truncation is None
            and be.padding is None
            and be.encode_special_tokens
            == bool(getattr(self.tokenizer, "split_special_tokens", False))
        )

    def _encode(self, texts: list[str]) -> list[tuple[list[int], Any]]:
        """(ids, the tokenizers.Encoding or None) of each text, tokenized as
        tokenizer(texts, add_special_tokens=False) tokenizes it."""
        if not texts:
            return []
        if self._backend is None:  # a slow tokenizer: no Encoding, nothing is anchored
            found = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            return [(ids, None) for ids in found]
        if self._backend_ready():
            encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        else:
            encodings = self.tokenizer(texts, add_special_tokens=False).encodings
        return [(e.ids, e) for e in encodings]

    # ----------------------------------------------------------------------------------------
    # boundaries

    def _anchor(
        self, text: str, ids: list[int], encoding: Any, length: int
    ) -> tuple[int, int] | None:
        """For a boundary text of `length` characters that starts `text`: (index, end
        character) of F's last added token that ends at or before it ((-1, 0): none), or None
        when the anchored rule does not apply (an added token across the boundary, a character
        without a token, offsets that do not spell the added token). Added tokens are single
        tokens, so only the token holding the boundary's last character can straddle it."""
        markers = self._markers
        k = encoding.char_to_token(length - 1) if length else None
        if k is None:
            return None
        while k >= 0:
            content = markers.get(ids[k])
            if content is not None:
                start, end = encoding.token_to_chars(k)
                if text[start:end] != content or start < length < end:
                    return None
                if end <= length:
                    return k, end
            k -= 1
        return -1, 0

    def _tail(self, marker: int, tail: str) -> list[int] | None:
        """Tokens of the piece after `marker` (-1: the text's start) up to the boundary."""
        key = (marker, tail)
        if key in self._tails:
            return self._tails[key]
        prefix = self._markers[marker] if marker >= 0 else ""
        [(ids, _)] = self._encode([prefix + tail])
        found: list[int] | None = list(ids[1:]) if marker >= 0 else list(ids)
        if marker >= 0 and (not ids or ids[0] != marker):
            found = None  # the marker alone does not come back as itself: tokenize B whole
        if len(tail) <= TAIL_CHARS and len(self._tails) < TAIL_CACHE:
            self._tails[key] = found
        return found

    def _boundary(self, text: str, ids: list[int], encoding: Any, bound: str) -> int | None:
        """The reference's common prefix of tokenize(bound) and F, or None: tokenize it whole."""
        if not self._anchored or encoding is None or not text.startswith(bound):
            return None
        found = self._anchor(text, ids, encoding, len(bound))
        if found is None:
            return None
        at, start = found
        if at < 0 and len(bound) > TAIL_CHARS:
            return None  # no marker before it: the whole text, tokenized with the others
        tail = self._tail(ids[at] if at >= 0 else -1, bound[start:])
        if tail is None:
            return None
        return at + 1 + _common_prefix(tail, ids[at + 1 :])

    # ----------------------------------------------------------------------------------------
    # conversations

    def spans(
        self, conversations: list[list[Message]], *, last_only: bool
    ) -> list[tuple[list[int], list[tuple[int, int]]] | TurnError]:
        """For each conversation: its `input_ids` and the (start, end) token spans of its
        trained assistant turns, or the reference's TurnError."""
        if not self._ready:
            self._setup()
        if conversations:
            self._check_render(conversations[0])
        texts, bounds = [], []
        for messages in conversations:
            last = len(messages) - 1
            texts.append(self._render(messages, False))
            own = []
            for i in trained_turns(messages, last_only):
                through = None if i == last else self._render(messages[: i + 1], False)
                own.append((i, self._render(messages[:i], True), through))
            bounds.append(own)
        encoded = self._encode(texts)
        resolved: list[list[list[Any]]] = []
        whole: list[str] = []  # boundary texts tokenized whole (the reference's way)
        for text, (ids, encoding), own in zip(texts, encoded, bounds, strict=True):
            row = []
            for i, prompt, through in own:
                parts: list[Any] = [i]
                for bound in (prompt, through):
                    if bound is None:
                        parts.append(len(ids))
                        continue
                    found = self._boundary(text, ids, encoding, bound)
                    if found is None:
                        found = ~len(whole)  # negative: the index of a text to tokenize
                        whole.append(bound)
                    parts.append(found)
                row.append(parts)
            resolved.append(row)
        extra = [ids for ids, _ in self._encode(whole)]
        out: list[tuple[list[int], list[tuple[int, int]]] | TurnError] = []
        for (ids, _), row in zip(encoded, resolved, strict=True):
            full = list(ids)
            turns, error = [], None
            for i, start, end in row:
                start = start if start >= 0 else _common_prefix(extra[~start], full)
                end = end if end >= 0 else _common_prefix(extra[~end], full)
                if end <= start:
                    error = TurnError(
                        f"assistant turn {i} (messages[{i}]) has no tokens of its own in the "
                        "rendered conversation: the chat template renders it differently when "
                        "later turns follow"
                    )
                    break
                turns.append((start, end))
            out.append(error or (full, turns))
        return out


def completion_mask(length: int, turns: list[tuple[int, int]]) -> list[int]:
    mask = [0] * length
    for start, end in turns:
        mask[start:end] = [1] * (end - start)
    return mask


def labels(ids: list[int], turns: list[tuple[int, int]]) -> list[int]:
    """TRL SFTTrainer's labels for these rows with completion_only_loss: the token where the
    completion mask is 1, -100 elsewhere."""
    out = [-100] * len(ids)
    for start, end in turns:
        out[start:end] = ids[start:end]
    return out


def tokenize_conversations(
    tokenizer: Any, conversations: list[list[Message]], *, last_only: bool
) -> list[Tokens | TurnError]:
    """turns.tokenize_turns for many conversations: the same `input_ids` and
    `completion_mask` (or the same TurnError) for each."""
    found = ChatTokenizer(tokenizer).spans(conversations, last_only=last_only)
    return [
        f
        if isinstance(f, TurnError)
        else {"input_ids": f[0], "completion_mask": completion_mask(len(f[0]), f[1])}
        for f in found
    ]
