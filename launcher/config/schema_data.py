"""The recipe's `data` section and its sources (the list form of data.train /
data.validation), split from schema.py, which re-exports them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from launcher.config.sections import Section


class DataSource(Section):
    """One data source of data.train / data.validation (the list form)."""

    path: str = Field(
        description="Local jsonl/json/csv/parquet file, or a hub dataset id (owner/name) read "
        "offline from the Hugging Face cache (`hf download --repo-type dataset owner/name`)."
    )
    subset: str | None = Field(
        None,
        description="Hub datasets: the configuration (subset) name, e.g. `en`; default: the "
        "dataset's default configuration.",
    )
    data_dir: str | None = Field(
        None,
        description="Hub datasets: read only the files under this folder of the dataset "
        "(datasets' data_dir, e.g. `data/rl` of stack-exchange-paired).",
    )
    split: str = Field(
        "train",
        description="Hub datasets: the split, with an optional slice as datasets writes it "
        "(`train[:20%]`, `train[100:200]`).",
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Training sources only: this source's share of the training mix, relative to the "
        "other sources' weights (rows repeated or sampled to reach it, by data.seed); give "
        "every source a weight or none (then every row is used once).",
    )
    max_samples: int | None = Field(
        None,
        gt=0,
        description="At most this many rows of this source (its first valid ones, after the "
        "validation split), before mixing.",
    )
    columns: dict[str, str] | None = Field(
        None,
        description="Source column -> the format's column for this source; default: data.columns.",
    )


DataSources = str | list[DataSource]


class DataConfig(Section):
    train: DataSources = Field(
        description="Local jsonl/json/csv/parquet file or hub dataset id, or a list of sources "
        "({path, subset, split, weight, max_samples, columns}) mixed into one training set."
    )
    validation: DataSources | None = Field(
        None,
        description="Validation source(s), used whole; default: a split of each train source.",
    )
    format: Literal[
        "alpaca", "messages", "text", "preference", "classification", "kto", "reward"
    ] = Field(
        "alpaca",
        description="alpaca: instruction/input/output; messages: OpenAI-style chat, every "
        "assistant turn trained (data.assistant_turns); text: raw text (continued pretraining); "
        "preference: prompt/chosen/rejected (DPO), chosen/rejected as answers or as whole "
        "conversations repeating the prompt (Argilla/UltraFeedback), an optional system "
        "column (a system turn first), trained by train.preference_loss; classification: text + label columns; kto: unpaired "
        "prompt/completion/label (true: desirable) rows (KTO), or messages (the last turn the "
        "completion) + label; reward: prompt/chosen/rejected "
        "pairs for a reward model (model.task=sequence_classification, model.num_labels=1).",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template: chatml, llama3 or alpaca (their special tokens added when "
        "missing, their end-of-turn token made EOS), or Jinja text; default: the tokenizer's "
        "own.",
    )
    alpaca_prompt: Literal["joined", "joined_newline", "stanford_system", "stanford_user"] = Field(
        "joined",
        description="How an alpaca row becomes the prompt: joined (user: instruction, blank "
        "line, input); joined_newline (one newline: LLaMA-Factory); stanford_system (the "
        "Stanford Alpaca preamble as a system turn, the input under '### Input:': oumi, and "
        "axolotl's text with chat_template alpaca); stanford_user (the whole Stanford prompt "
        "in the user turn: torchtune).",
    )
    eos_token: str | None = Field(
        None, description="EOS token, a token of the vocabulary; default: the tokenizer's."
    )
    pad_token: str | None = Field(
        None,
        description="Pad token (added when not in the vocabulary; the EOS itself allowed "
        "except for a classifier: padding is masked by the attention mask, not by id); "
        "default: the tokenizer's when distinct from EOS, else a free one.",
    )
    max_seq_len: int | None = Field(
        2048,
        gt=0,
        le=1_048_576,
        description="Tokens per example, longer ones truncated; null: no truncation, every "
        "example whole (torchtune's max_seq_len: null; not with packing). The memory estimate "
        "then assumes the model's context length, the longest an example can be.",
    )
    packing: bool = Field(False, description="Pack several examples into one sequence.")
    streaming: bool = Field(
        False,
        description="Stream data.train (data.format=text, one source) instead of reading it "
        "whole first: rows are read, checked, tokenized and packed as training consumes them "
        "(axolotl's pretraining_dataset, LLaMA-Factory's streaming), each rank its own part; "
        "a hub dataset still comes from the local cache. Needs train.max_steps; rows are not "
        "counted ahead, so no val_split (give data.validation, read whole), no mix, no "
        "evals_per_epoch; invalid rows stop the run or are dropped as they are met.",
    )
    shuffle_buffer: int | None = Field(
        None,
        ge=0,
        description="data.streaming: rows shuffled through a buffer of this many, by data.seed "
        "(LLaMA-Factory's buffer_size); 0: the source's order. Default: 10000.",
    )
    val_split: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of train held out for validation (no validation file).",
    )
    seed: int = Field(
        42,
        description="Seed of the train/validation split, of the mix of several sources and of "
        "a stream's shuffle buffer.",
    )
    completion_only_loss: bool = Field(
        True, description="Loss only on completion tokens for instruction/chat data."
    )
    assistant_turns: Literal["all", "last"] = Field(
        "all",
        description="Chat data (alpaca, messages): which assistant turns of a conversation "
        "are trained with completion_only_loss: all of them, or only the last (earlier turns "
        "are then context, like the user's).",
    )
    invalid_rows: Literal["drop", "error"] = Field(
        "error", description="Invalid rows: drop them with a warning, or stop with an error."
    )
    max_samples: int | None = Field(
        None,
        gt=0,
        description="Train on at most this many rows (the first valid ones, after the "
        "validation split; of several sources, the first of the mix); default: all.",
    )
    num_proc: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Processes that tokenize and pack the data on each node (datasets' "
        "num_proc, TRL's dataset_num_proc); default: one.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Source column -> the format's column, e.g. {conversations: messages} or "
        "{question: instruction, answer: output}.",
    )
    role_key: str = Field("role", description="Key of a chat turn's role (ShareGPT: from).")
    content_key: str = Field("content", description="Key of a chat turn's text (ShareGPT: value).")
    roles: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(
        default_factory=dict,
        description="Source role names -> roles, e.g. {human: user, gpt: assistant} (ShareGPT).",
    )
    text_column: str = Field("text", description="Text column (text/classification formats).")
    label_column: str = Field("label", description="Label column (classification format).")

    def train_sources(self) -> list[DataSource]:
        """data.train as a list of sources (the single-string form is one source)."""
        return _sources(self.train)

    def validation_sources(self) -> list[DataSource]:
        """data.validation as a list of sources ([] when not given)."""
        return _sources(self.validation) if self.validation else []


def _sources(value: DataSources) -> list[DataSource]:
    return [DataSource(path=value)] if isinstance(value, str) else list(value)
