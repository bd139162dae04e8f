"""Model shapes: read from config.json when it is on disk (a model directory, or the local
Hugging Face cache for a hub id), else a built-in table.

The planner needs exact parameter counts without downloading or instantiating anything,
so a shape is a few integers and the counts are closed-form (checked against the real
transformers models on the meta device in tests/unit/test_arch.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide a model's size and cost."""

    model_type: str  # llama | mistral | qwen2 | qwen3 | distilbert
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 4096
    torch_dtype: str | None = None

    @property
    def is_decoder(self) -> bool:
        return self.model_type != "distilbert"

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2"

    @property
    def layer_class(self) -> str:
        """transformers' class of one block (what FSDP wraps), e.g. Qwen2DecoderLayer."""
        return _LAYER_CLASS[self.model_type]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each adaptable linear in one block."""
        h, hd = self.hidden_size, self.head_dim
        if not self.is_decoder:
            return {
                "q_lin": (h, h),
                "k_lin": (h, h),
                "v_lin": (h, h),
                "out_lin": (h, h),
                "lin1": (h, self.intermediate_size),
                "lin2": (self.intermediate_size, h),
            }
        return {
            "q_proj": (h, self.num_heads * hd),
            "k_proj": (h, self.num_kv_heads * hd),
            "v_proj": (h, self.num_kv_heads * hd),
            "o_proj": (self.num_heads * hd, h),
            "gate_proj": (h, self.intermediate_size),
            "up_proj": (h, self.intermediate_size),
            "down_proj": (self.intermediate_size, h),
        }

    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values())

    def bias_params_per_layer(self) -> int:
        if self.qkv_bias:
            return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if not self.is_decoder:
            return 4 * self.hidden_size + self.intermediate_size + self.hidden_size
        return 0

    def norm_params_per_layer(self) -> int:
        if self.model_type == "qwen3":  # and an RMSNorm of the queries' and keys' heads
            return 2 * self.hidden_size + 2 * self.head_dim
        return (4 if not self.is_decoder else 2) * self.hidden_size

    def embedding_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        if not self.is_decoder:  # position embeddings + embedding LayerNorm
            emb += self.max_position_embeddings * self.hidden_size + 2 * self.hidden_size
        return emb

    def head_params(self, num_labels: int = 2) -> int:
        if not self.is_decoder:  # pre_classifier + classifier
            return (
                self.hidden_size * self.hidden_size
                + self.hidden_size
                + (self.hidden_size * num_labels + num_labels)
            )
        final_norm = self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return final_norm + lm_head

    def total_params(self) -> int:
        per_layer = (
            self.linear_params_per_layer()
            + self.bias_params_per_layer()
            + self.norm_params_per_layer()
        )
        return self.embedding_params() + self.num_layers * per_layer + self.head_params()

    def quantizable_params(self) -> int:
        """Parameters bitsandbytes puts in 4-bit: the blocks' linear weights."""
        return self.num_layers * self.linear_params_per_layer()

    def module_params(self, name: str, num_labels: int = 2) -> int | None:
        """Parameters of a top-level module named in method.modules_to_save (peft trains a
        copy of it in full), or None for a name outside this table."""
        h, v = self.hidden_size, self.vocab_size
        if self.is_decoder:
            table = {"embed_tokens": v * h, "lm_head": v * h, "score": h * num_labels}
        else:
            table = {
                "word_embeddings": v * h,
                "pre_classifier": h * h + h,
                "classifier": h * num_labels + num_labels,
            }
        return table.get(name)

    def targeted(self, targets: list[str] | str) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the linears of one block that `targets` names."""
        shapes = self.linear_shapes()
        names = list(shapes) if targets == "all-linear" else [t for t in targets if t in shapes]
        return {n: shapes[n] for n in names}

    @property
    def feedforward_module(self) -> str:
        """The MLP's output projection, whose input IA3 scales (peft's feedforward module)."""
        return "down_proj" if self.is_decoder else "lin2"

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        return self.num_layers * sum(r * (i + o) for i, o in self.targeted(targets).values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_LAYER_CLASS = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "qwen3": "Qwen3DecoderLayer",
    "distilbert": "TransformerBlock",
}


def _llama(
    v: int,
    h: int,
    i: int,
    n: int,
    heads: int,
    kv: int,
    tied: bool,
    kind: str = "llama",
    pos: int = 131072,
    hd: int | None = None,
) -> ModelShape:
    return ModelShape(kind, v, h, i, n, heads, kv, hd or h // heads, tied, pos, "bfloat16")


BUILTIN: dict[str, ModelShape] = {
    "llama3.1-8b": _llama(128256, 4096, 14336, 32, 32, 8, False),
    "llama3.1-70b": _llama(128256, 8192, 28672, 80, 64, 8, False),
    "llama3.2-1b": _llama(128256, 2048, 8192, 16, 32, 8, True),
    "llama3.2-3b": _llama(128256, 3072, 8192, 28, 24, 8, True),
    "tinyllama-1.1b": _llama(32000, 2048, 5632, 22, 32, 4, False, pos=2048),
    "mistral-7b": _llama(32768, 4096, 14336, 32, 32, 8, False, "mistral", 32768),
    "qwen2.5-0.5b": _llama(151936, 896, 4864, 24, 14, 2, True, "qwen2", 32768),
    "qwen2.5-1.5b": _llama(151936, 1536, 8960, 28, 12, 2, True, "qwen2", 32768),
    "qwen2.5-7b": _llama(152064, 3584, 18944, 28, 28, 4, False, "qwen2", 32768),
    # Qwen3: head_dim 128 whatever the width, no qkv bias, q/k norms (2507 models: the same
    # shapes with a longer context, which only the memory estimate's default length reads)
    "qwen3-0.6b": _llama(151936, 1024, 3072, 28, 16, 8, True, "qwen3", 40960, 128),
    "qwen3-4b": _llama(151936, 2560, 9728, 36, 32, 8, True, "qwen3", 40960, 128),
    "qwen3-8b": _llama(151936, 4096, 12288, 36, 32, 8, False, "qwen3", 40960, 128),
    "qwen3-14b": _llama(151936, 5120, 17408, 40, 40, 8, False, "qwen3", 40960, 128),
}

# what `tune-launch tiny` builds: small enough to train on a CPU in seconds; head_dim 32
# because vLLM's CPU attention supports head sizes 32, 64, 80, ... (not 16)
TINY: dict[str, ModelShape] = {
    "llama": _llama(1024, 128, 256, 2, 4, 2, False, "llama", 512),
    "mistral": _llama(1024, 128, 256, 2, 4, 2, False, "mistral", 512),
    "qwen2": _llama(1024, 128, 256, 2, 4, 2, False, "qwen2", 512),
    "qwen3": _llama(1024, 128, 256, 2, 4, 2, False, "qwen3", 512),
    "distilbert": ModelShape("distilbert", 1024, 64, 128, 2, 4, 4, 16, True, 512, "float32"),
}

_FAMILY_OF_BUILTIN = {key: shape.model_type for key, shape in BUILTIN.items()}


def family(architecture: str) -> str:
    """The model_type of a table key or of a tiny arch name (llama3.1-70b -> llama)."""
    if architecture in TINY:
        return architecture
    return _FAMILY_OF_BUILTIN.get(architecture, architecture)


def shape_from_config(config: dict[str, Any]) -> ModelShape | None:
    """A shape from a transformers config.json mapping, or None if unsupported."""
    kind = config.get("model_type")
    if kind == "distilbert":
        return ModelShape(
            "distilbert",
            config["vocab_size"],
            config["dim"],
            config["hidden_dim"],
            config["n_layers"],
            config["n_heads"],
            config["n_heads"],
            config["dim"] // config["n_heads"],
            True,
            config.get("max_position_embeddings", 512),
            config.get("dtype") or config.get("torch_dtype"),
        )
    if kind not in ("llama", "mistral", "qwen2", "qwen3"):
        return None
    if kind == "qwen3" and config.get("attention_bias"):
        return None  # biases on q/k/v/o: a shape this table does not count
    heads = config["num_attention_heads"]
    return ModelShape(
        model_type=kind,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        torch_dtype=config.get("dtype") or config.get("torch_dtype"),
    )


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the libraries find it now: HF_HUB_CACHE, else
    HUGGINGFACE_HUB_CACHE, else HF_HOME/hub (default ~/.cache/huggingface/hub). Read at call
    time, not at import like huggingface_hub.constants."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or str(
        Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def config_path(name_or_path: str) -> tuple[Path | None, str]:
    """Where the model's config.json lies without any network: (path, "local") for a model
    directory, (path, "cache") for a hub id in the local Hugging Face cache, else (None, why)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        path = local / "config.json"
        return (path, "local") if path.is_file() else (None, f"{local} has no config.json")
    if name_or_path.count("/") != 1 or name_or_path.startswith(("/", ".", "~")):
        return None, f"{name_or_path} is neither a local directory nor a hub id (owner/name)"
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    try:
        found = try_to_load_from_cache(name_or_path, "config.json", cache_dir=cache)
    except ValueError:  # not a valid repo id
        found = None
    if isinstance(found, str):
        return Path(found), "cache"
    return (
        None,
        f"{name_or_path} is not a local directory and not in the Hugging Face cache {cache}",
    )


def read_local_config(name_or_path: str) -> dict[str, Any] | None:
    """config.json of a local model directory, or of a hub model in the local Hugging Face
    cache (read offline, never downloaded), or None."""
    path, _ = config_path(name_or_path)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


MISSING_MODEL_FIX = (
    "download it first on a host with network access (`hf download OWNER/NAME`, into the cache "
    "the nodes share: HF_HOME / HF_HUB_CACHE), or give a local model directory"
)


def missing_model(name_or_path: str) -> str | None:
    """Why the model cannot be loaded without network (no local directory with a config.json,
    not in the Hugging Face cache), or None when it can (tiny:<arch> is built by the run)."""
    if name_or_path.startswith("tiny:"):
        return None
    path, where = config_path(name_or_path)
    return None if path is not None else where


def refuse_missing_model(name_or_path: str, recipe_name: str) -> None:
    """RecipeError (exit 2) before any process starts when the model cannot be loaded
    offline: ranks would each download it, or hang without network."""
    from launcher.errors import Problem, RecipeError

    missing = missing_model(name_or_path)
    if missing:
        problem = Problem("model.name_or_path", missing, MISSING_MODEL_FIX, name_or_path)
        raise RecipeError([problem], f"recipe {recipe_name}")
