"""Tiny models vLLM's CPU engine can serve, for the serve tests.

launcher.tiny's llama has head_dim 16, which vLLM's CPU attention rejects (it supports 32, 64,
...): `servable_tiny` rebuilds the same tiny llama with 2 heads of 32 (1 KV head), keeps its
tokenizer and generation config, and trains it for a few seconds on the quickstart data so
that greedy answers are a label followed by the EOS token `<|end|>` (a random model never
stops, and the contract check needs one that does).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_TRAIN = REPO / "recipes" / "data" / "quickstart_train.jsonl"
QUICKSTART_EVAL = REPO / "recipes" / "data" / "quickstart_eval.jsonl"


def chat_of(row: dict[str, str]) -> list[dict[str, str]]:
    content = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
    return [{"role": "user", "content": content}]


def write_contract(tokenizer, model_dir: Path, eos_ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    (model_dir / "train_contract.json").write_text(
        json.dumps(
            {
                "chat_template": tokenizer.chat_template,
                "eos_token_id": tokenizer.eos_token_id,
                "eos_token_ids": eos_ids,
                "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id,
            }
        )
    )


def servable_tiny(out_dir: Path, *, steps: int = 50, batch: int = 16, seed: int = 0) -> Path:
    """A tiny llama (head_dim 32) trained to answer quickstart questions then `<|end|>`."""
    import torch
    import transformers

    from launcher.tiny import write_tiny

    src = write_tiny(
        "llama", out_dir.with_name(out_dir.name + "-src"), corpus_files=[str(QUICKSTART_TRAIN)]
    )
    tok = transformers.AutoTokenizer.from_pretrained(src)
    config = transformers.AutoConfig.from_pretrained(src)
    if config.hidden_size // config.num_attention_heads < 32:
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = transformers.GenerationConfig.from_pretrained(src)
    rows = [json.loads(line) for line in QUICKSTART_TRAIN.read_text().splitlines() if line.strip()]
    seqs = []
    for row in rows:
        messages = chat_of(row)
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        full = tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": row["output"]}]
        )["input_ids"]
        seqs.append((full, len(prompt)))
    width = max(len(f) for f, _ in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    for i, (full, n_prompt) in enumerate(seqs):
        ids[i, : len(full)] = torch.tensor(full)
        labels[i, n_prompt : len(full)] = torch.tensor(full[n_prompt:])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen_torch = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(seqs), (batch,), generator=gen_torch)
        loss = model(input_ids=ids[pick], labels=labels[pick]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.generation_config = gen
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    write_contract(tok, out_dir, list(gen.eos_token_id))
    return out_dir


def random_adapter(base_dir: Path, out_dir: Path, *, r: int = 8, std: float = 1.0) -> Path:
    """A peft LoRA adapter on base_dir with non-zero random lora_B (so it changes answers),
    saved like RUN_DIR/final: adapter + tokenizer + generation config + train_contract.json."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(out_dir)
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    tok.save_pretrained(out_dir)
    gen = transformers.GenerationConfig.from_pretrained(base_dir)
    gen.save_pretrained(out_dir)
    write_contract(tok, out_dir, list(gen.eos_token_id))
    return out_dir


def make_run_dir(root: Path, overrides: list[str] | None = None) -> Path:
    """A run directory named like its run, plan.json from the real resolver (quickstart-like)."""
    from launcher.config.plan import ClusterFacts, resolve
    from launcher.config.recipe import load_recipe, localize
    from launcher.plan_files import write_plan

    recipe = load_recipe(
        REPO / "recipes" / "quickstart.yaml", [f"name={root.name}", *(overrides or [])]
    )
    recipe = localize(recipe, REPO / "recipes")
    plan = resolve(recipe, ClusterFacts(run_dir=str(root), python=sys.executable, cpus=2))
    write_plan(plan)
    return root


def write_metrics(run: Path) -> None:
    from launcher.rundir import RunDir

    rows = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-3} for s in range(5, 61, 5)]
    rows += [{"step": s, "eval_loss": 2.5 / s**0.5} for s in (20, 40, 60)]
    RunDir(run).metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
