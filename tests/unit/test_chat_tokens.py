"""Conversations tokenized in batches (launcher/data/chat_tokens.py) get the `input_ids` and
loss masks of the reference, turns.tokenize_turns, whose boundaries come from tokenizing every
prompt again: for byte-level BPE and SentencePiece-like (Metaspace) tokenizers, with and
without a normalizer, added tokens that strip whitespace, the tiny, chatml, llama3 and alpaca
templates, and contents that start or end with spaces and newlines or spell a chat marker.
Where the one-tokenization rule applies, it is the one used (no prompt tokenized again)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from launcher.data.chat_tokens import ChatTokenizer, labels, tokenize_conversations
from launcher.data.templates import TEMPLATES
from launcher.data.turns import TurnError, tokenize_turns

CORPUS = "is the food good? positive thanks goodbye be brief the movie was great awful\n\n"
MARKERS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CONTENTS = [
    "the food",
    " the food",
    "the food ",
    "\nthe food",
    "the\n\nfood\n",
    "  two  spaces  ",
    "a <|end|> in the middle",
    "x<|assistant|>y",
    "ünïcödé 食べ物",
    "### Response:\nthe",
    "",
]


def _fast(pre_tokenizer: Any, normalizer: Any = None, strip: bool = False) -> Any:
    from tokenizers import AddedToken, Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    from launcher.tiny import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    specials = ["<pad>", "<s>", "</s>", "<unk>", *MARKERS]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([CORPUS * 3, *CONTENTS], trainer=trainer)
    if strip:  # markers that take the whitespace around them (as some `<mask>` tokens do)
        tok.add_special_tokens(
            [AddedToken(m, lstrip=True, rstrip=True, special=True) for m in MARKERS]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=MARKERS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tokenizers() -> dict[str, Any]:
    from tokenizers import normalizers, pre_tokenizers

    from launcher.tiny import build_tokenizer

    return {
        "byte_level": build_tokenizer([CORPUS, *CONTENTS], 400),
        "byte_level_prefix_space": _fast(pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "metaspace_first": _fast(pre_tokenizers.Metaspace(prepend_scheme="first")),
        "metaspace_always_nfkc": _fast(
            pre_tokenizers.Metaspace(prepend_scheme="always"), normalizers.NFKC()
        ),
        "markers_strip_whitespace": _fast(pre_tokenizers.ByteLevel(), strip=True),
    }


TOKENIZERS = tokenizers()


def with_template(tokenizer: Any, name: str) -> Any:
    """The tokenizer with a named template of launcher/data/templates.py (its tokens added)."""
    if name == "own":
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    named = TEMPLATES[name]
    missing = [t for t in named.special_tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    tok.chat_template = named.jinja
    return tok


def conversations() -> list[list[dict[str, str]]]:
    out = []
    for user, answer in itertools.product(CONTENTS, CONTENTS[:-1]):
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    for a, b in zip(CONTENTS, reversed(CONTENTS), strict=True):
        out.append(
            [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": a},
                {"role": "assistant", "content": b or "ok"},
                {"role": "user", "content": b},
                {"role": "assistant", "content": a},
            ]
        )
    return out


def reference(tokenizer: Any, chat: list[dict[str, str]], last_only: bool) -> Any:
    try:
        return tokenize_turns(tokenizer, chat, last_only=last_only)
    except TurnError as exc:
        return f"TurnError: {exc}"


@pytest.mark.parametrize("template", ["own", "chatml", "llama3", "alpaca"])
@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_batches_equal_the_reference(kind: str, template: str) -> None:
    tok = with_template(TOKENIZERS[kind], template)
    chats = conversations()
    for last_only in (False, True):
        found = tokenize_conversations(tok, chats, last_only=last_only)
        got = [f"TurnError: {f}" if isinstance(f, TurnError) else f for f in found]
        assert got == [reference(tok, c, last_only) for c in chats]


@pytest.mark.parametrize("template", ["own", "chatml", "llama3"])
@pytest.mark.parametrize("kind", ["byte_level", "metaspace_first", "metaspace_always_nfkc"])
def test_marker_templates_tokenize_each_conversation_once(kind: str, template: str) -> None:
    """With markers before every turn boundary, no prompt is tokenized again (the rows of the
    test above are then the one-tokenization rule's)."""
    tok = with_template(TOKENIZERS[kind], template)
    chat = ChatTokenizer(tok)
    chats = [c for c in conversations() if "<|" not in str(c)]  # no marker text in contents
    texts: list[list[str]] = []
    encode = chat._encode

    def counted(batch: list[str]) -> Any:
        texts.append(batch)
        return encode(batch)

    chat._encode = counted  # type: ignore[method-assign]
    chat.spans(chats, last_only=False)
    assert len(texts[0]) == len(chats)  # the conversations
    assert all(len(batch) <= 3 for batch in texts[1:])  # a marker's tail, once each
    assert texts[-1] == []  # nothing tokenized whole


def test_whitespace_stripping_markers_tokenize_prompts_whole() -> None:
    chat = ChatTokenizer(TOKENIZERS["markers_strip_whitespace"])
    chat.spans(conversations()[:3], last_only=False)
    assert not chat._anchored


def test_compiled_render_equals_apply_chat_template() -> None:
    tok = with_template(TOKENIZERS["byte_level"], "alpaca")
    chat = ChatTokenizer(tok)
    chat.spans(conversations()[:1], last_only=False)
    assert chat._template is not None  # the compiled render was kept
    for c in conversations():
        for prompt in (False, True):
            assert chat._render(c, prompt) == tok.apply_chat_template(
                c, tokenize=False, add_generation_prompt=prompt
            )


def test_a_render_that_differs_falls_back_to_apply_chat_template() -> None:
    tok = with_template(TOKENIZERS["byte_level"], "alpaca")
    chat = ChatTokenizer(tok)
    chat._setup()
    chat._variables["bos_token"] = "<changed>"  # as if the compiled render went astray
    first = conversations()[0]
    chat._check_render(first)
    assert chat._template is None
    assert chat._render(first, False) == tok.apply_chat_template(first, tokenize=False)


def test_labels_are_trls_from_the_mask() -> None:
    ids, turns = [5, 6, 7, 8, 9, 10], [(1, 3), (4, 6)]
    assert labels(ids, turns) == [-100, 6, 7, -100, 9, 10]
