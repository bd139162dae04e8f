"""Tiny random models of real architectures, with a locally trained tokenizer.

`tune-launch tiny llama DIR` writes a model that `AutoModelForCausalLM` / `AutoTokenizer`
load offline: a byte-level BPE tokenizer trained here (on a small built-in corpus plus any
texts given), a chat template whose assistant turns end with the EOS token `<|end|>`, and a
generation config with those EOS ids. Smoke runs, tests and the CPU quickstart use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.config.arch import TINY, ModelShape

if TYPE_CHECKING:
    from launcher.config.plan import Plan

ARCHES = tuple(TINY)
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_BASE_CORPUS = (
    "the of and to in is was for on that with as by at from it an be this which or are were "
    "not but have has had one all their they you he she we can will would there what when who "
    "how why where question answer instruction input output user assistant system good bad "
    "great awful movie film book food service review positive negative neutral yes no true "
    "false zero one two three four five six seven eight nine ten number word letter reverse "
    "repeat copy sum plus minus times equals first last next previous hello world please thanks"
)


def _texts_from_file(path: Path, limit: int = 20000) -> Iterable[str]:
    """String values of a jsonl/json file, for the tokenizer's training corpus."""

    def strings(value: object) -> Iterable[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    count = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            yield from strings(row)
            count += 1
            if count >= limit:
                return


def build_tokenizer(corpus: Iterable[str], vocab_size: int, encoder: bool = False) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_BASE_CORPUS, *corpus], trainer=trainer)
    if encoder:
        cls_id, sep_id = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> $B </s>",
            special_tokens=[("<s>", cls_id), ("</s>", sep_id)],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>" if encoder else "<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        cls_token="<s>" if encoder else None,
        sep_token="</s>" if encoder else None,
        mask_token="<unk>" if encoder else None,
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "</s>"],
        model_max_length=512,
    )
    if not encoder:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def decoder_config(shape: ModelShape, **extra: Any) -> Any:
    """The transformers config of a decoder shape (llama, mistral, qwen2, qwen3)."""
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[shape.model_type]
    return cls(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        **extra,
    )


def _config(arch: str, shape: ModelShape, tok: Any, num_labels: int) -> Any:
    import transformers

    if arch == "distilbert":
        return transformers.DistilBertConfig(
            vocab_size=shape.vocab_size,
            dim=shape.hidden_size,
            hidden_dim=shape.intermediate_size,
            n_layers=shape.num_layers,
            n_heads=shape.num_heads,
            max_position_embeddings=shape.max_position_embeddings,
            pad_token_id=tok.pad_token_id,
            num_labels=num_labels,  # type: ignore[call-arg]
        )
    return decoder_config(
        shape,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5,
        # wider than the 0.02 default: with a frozen random lm_head and final norm, 0.02 caps
        # every logit near 2.5, so no adapter could make the model confident about anything
        initializer_range=0.1,
    )


def write_tiny(
    arch: str,
    out_dir: str | Path,
    *,
    corpus_files: list[str] | None = None,
    seed: int = 0,
    num_labels: int = 2,
    shape: ModelShape | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Write a tiny random `arch` model with a tokenizer to out_dir; returns out_dir.
    `shape` swaps in other dimensions (a full-size one from launcher.arch.BUILTIN, for GPU
    benchmarks: random weights, built on `device` and saved in `dtype`); the tokenizer stays
    tiny, so its ids are a subset of the model's vocabulary."""
    import torch
    import transformers

    if arch not in TINY:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHES)}")
    shape = shape or TINY[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus: list[str] = []
    for name in corpus_files or []:
        corpus.extend(_texts_from_file(Path(name)))
    tok = build_tokenizer(corpus, TINY[arch].vocab_size, encoder=arch == "distilbert")
    assert len(tok) <= shape.vocab_size
    config = _config(arch, shape, tok, num_labels)
    torch.manual_seed(seed)
    kind = (
        transformers.AutoModelForSequenceClassification
        if arch == "distilbert"
        else transformers.AutoModelForCausalLM
    )
    with torch.device(device):
        model = kind.from_config(config, dtype=getattr(torch, dtype))
    if arch != "distilbert":
        end_id = tok.convert_tokens_to_ids("<|end|>")
        eos_ids = [end_id, tok.convert_tokens_to_ids("</s>")]
        model.generation_config = transformers.GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=eos_ids,
            pad_token_id=tok.pad_token_id,
        )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_base(plan: Plan) -> None:
    """RUN_DIR/base for a `tiny:<arch>` recipe (its tokenizer trained on the training data),
    built once, by the submitting host, before any rank starts; a no-op otherwise."""
    arch = plan.tiny_arch
    base = Path(plan.base_model)
    if arch is None or (base / "config.json").is_file():
        return
    paths = [Path(source.path) for source in plan.recipe.data.train_sources()]
    corpus = [str(path) for path in paths if path.is_file()]
    tmp = base.with_name("base.tmp")
    write_tiny(
        arch,
        tmp,
        corpus_files=corpus,
        seed=plan.recipe.train.seed,
        num_labels=plan.recipe.model.num_labels or 2,
    )
    tmp.replace(base)
