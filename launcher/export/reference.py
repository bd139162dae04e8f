"""Held-out prompts and the merged model's greedy answers: what every export is compared with.

The prompts are the evaluation's own (serve/examples.py: eval.data, data.validation or the
held-out split), rendered by training's chat template with the generation prompt; the
reference is transformers' greedy decoding of the fine-tuned model (RUN_DIR/merged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.rundir import RunDir

GENERATE_TOKENS = 16  # greedy tokens per prompt (an answer stops earlier, at EOS)
MAX_PROMPTS = 60


@dataclass(frozen=True)
class Prompt:
    text: str  # the rendered chat prompt
    ids: list[int]  # training's tokenization of it
    answer: str  # the held-out reference answer


@dataclass
class Generation:
    """One greedy answer: its tokens and text (EOS excluded) and whether it stopped at EOS."""

    tokens: list[int]
    stopped: bool
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def held_out_prompts(run: RunDir, model_dir: Path, limit: int = MAX_PROMPTS) -> list[Prompt]:
    from transformers import AutoTokenizer

    from serve.examples import held_out

    examples, _, _ = held_out(run.load_plan().recipe)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = []
    for ex in examples[:limit]:
        text = str(tok.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompts.append(Prompt(text=text, ids=list(ids), answer=ex.reference))
    return prompts


def calibration_texts(run: RunDir, model_dir: Path, limit: int) -> list[str]:
    """Training rows (prompt + answer) as training rendered them: the quantizer's calibration."""
    from transformers import AutoTokenizer

    from serve.examples import held_out

    _, pool, _ = held_out(run.load_plan().recipe)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = []
    for ex in pool[:limit]:
        turns = [*ex.messages, {"role": "assistant", "content": ex.reference}]
        texts.append(str(tok.apply_chat_template(turns, tokenize=False)))
    return texts


def cut_at_eos(tokens: list[int], eos: list[int], limit: int = GENERATE_TOKENS) -> Generation:
    for i, tok in enumerate(tokens[:limit]):
        if tok in eos:
            return Generation(tokens[:i], True)
    return Generation(tokens[:limit], False)


def greedy_transformers(model_dir: Path, prompts: list[Prompt], eos: list[int]) -> list[Generation]:
    """Greedy decoding by transformers, one prompt at a time (no padding to disagree on)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p.ids])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=GENERATE_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            g = cut_at_eos(gen[0, ids.shape[1] :].tolist(), eos)
            g.text = str(tok.decode(g.tokens, skip_special_tokens=True))
            out.append(g)
    return out


def compare(
    prompts: list[Prompt], reference: list[Generation], got: list[Generation]
) -> dict[str, Any]:
    """Agreement of `got` with the merged model's greedy answers, and both scored against the
    held-out answers with the evaluation's own exact match (serve/scoring.py)."""
    from serve.scoring import score_prediction

    same = [
        r.text == g.text and r.stopped == g.stopped for r, g in zip(reference, got, strict=True)
    ]
    n = len(prompts)
    first_diff = next((i for i, s in enumerate(same) if not s), None)
    return {
        "prompts": n,
        "agreement": sum(same) / n if n else 0.0,  # the same greedy answer, stopped alike
        "exact_match": sum(
            score_prediction(g.text, p.answer)[0] for p, g in zip(prompts, got, strict=True)
        )
        / max(n, 1),
        "merged_exact_match": sum(
            score_prediction(r.text, p.answer)[0] for p, r in zip(prompts, reference, strict=True)
        )
        / max(n, 1),
        "first_difference": None
        if first_diff is None
        else {
            "prompt": prompts[first_diff].text,
            "merged": reference[first_diff].text,
            "export": got[first_diff].text,
        },
    }
