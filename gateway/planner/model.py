"""Model description read from a Hugging Face ``config.json``.

Only the numbers that decide tensor parallelism, memory and speed are kept. Multimodal models nest their
language model (InternVL under ``llm_config``, others under ``text_config`` or ``language_config``); the
top level is read first, then those. A vision tower (``vision_config``) adds its weights.

Parameter counts assume the decoder shape every supported model shares (Llama, Qwen2, InternLM,
InternLM2): attention with grouped KV heads and a gated (SwiGLU) MLP of three matrices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.errors import UserError

LLM_CONFIG_KEYS = ("llm_config", "text_config", "language_config")

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "fp16": 2, "bf16": 2, "fp32": 4}

# Bytes per KV-cache element by LMDeploy `quant_policy`: 0 = fp16/bf16, 8 = int8, 4 = int4.
KV_BYTES_BY_QUANT_POLICY = {0: 2.0, 8: 1.0, 4: 0.5}


@dataclass(frozen=True)
class VisionTower:
    """A ViT-style vision encoder plus the MLP projector into the language model."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    projector_params: int

    @property
    def param_count(self) -> int:
        per_layer = 4 * self.hidden_size**2 + 2 * self.hidden_size * self.intermediate_size
        per_layer += 4 * self.hidden_size + self.intermediate_size  # biases and norms
        return self.num_layers * per_layer + self.projector_params


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only language model (and its optional vision tower).

    Byte counts are for the weights as stored (``dtype_bytes`` per parameter).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    vision: VisionTower | None = None

    @property
    def attention_params_per_layer(self) -> int:
        q_and_o = 2 * self.hidden_size * self.num_attention_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        bias = (self.num_attention_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return q_and_o + k_and_v + bias

    @property
    def mlp_params_per_layer(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def layer_params(self) -> int:
        """Parameters of all decoder layers: the part every token's forward pass reads."""
        norms = 2 * self.hidden_size
        return self.num_layers * (self.attention_params_per_layer + self.mlp_params_per_layer + norms)

    @property
    def embedding_params(self) -> int:
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * self.hidden_size

    @property
    def llm_param_count(self) -> int:
        return self.layer_params + self.embedding_params + self.hidden_size

    @property
    def param_count(self) -> int:
        return self.llm_param_count + (self.vision.param_count if self.vision else 0)

    @property
    def weight_bytes(self) -> int:
        return self.param_count * self.dtype_bytes

    def kv_cache_bytes_per_token(self, quant_policy: int = 0) -> float:
        """KV-cache bytes one token occupies across all layers and KV heads (whole model, no TP split)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * kv_element_bytes(quant_policy)

    def kv_heads_per_gpu(self, tp: int) -> int:
        """KV heads each TP rank stores: split when there are enough, otherwise replicated (one per rank)."""
        return max(1, -(-self.num_kv_heads // tp))


def kv_element_bytes(quant_policy: int) -> float:
    try:
        return KV_BYTES_BY_QUANT_POLICY[quant_policy]
    except KeyError:
        raise UserError(f"quant_policy must be 0, 4 or 8, not {quant_policy}") from None


def bundled_cards() -> list[str]:
    """Names of the model cards shipped with tpgate (configuration numbers only, no weights)."""
    cards = resources.files("gateway.planner").joinpath("cards")
    return sorted(p.name.removesuffix(".json") for p in cards.iterdir() if p.name.endswith(".json"))


def load_model(name_or_path: str) -> ModelSpec:
    """Load a bundled card by name (``internvl2_5-38b``), a model directory, or a ``config.json`` file."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{name_or_path}: model directory has no config.json")
    elif not path.is_file():
        card = resources.files("gateway.planner").joinpath("cards", f"{name_or_path.lower()}.json")
        if not card.is_file():
            raise UserError(
                f"unknown model {name_or_path!r}: not a file or directory, and not a bundled card "
                f"({', '.join(bundled_cards())})"
            )
        return model_from_config(_parse_json(card.read_text(), name_or_path), name=name_or_path.lower())
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    return model_from_config(_parse_json(text, str(path)), name=path.parent.name or str(path))


def _parse_json(text: str, source: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{source}: malformed config.json: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(config, dict):
        raise UserError(f"{source}: config.json must hold a JSON object")
    return config


def find_llm_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's section: the top level when it has head counts, else a nested one."""
    if "num_attention_heads" in config:
        return config
    for key in LLM_CONFIG_KEYS:
        nested = config.get(key)
        if isinstance(nested, dict) and "num_attention_heads" in nested:
            return nested
    return config


def model_from_config(config: dict[str, Any], *, name: str) -> ModelSpec:
    """Build a :class:`ModelSpec` from a parsed ``config.json``; missing required numbers raise UserError."""
    llm = find_llm_config(config)

    def number(key: str, *alternatives: str, default: int | None = None) -> int:
        for k in (key, *alternatives):
            value = llm.get(k)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise UserError(f"{name}: config field {k!r} must be a positive integer, not {value!r}")
                return value
        if default is not None:
            return default
        raise UserError(f"{name}: config has no {key!r} (looked at the top level and in {', '.join(LLM_CONFIG_KEYS)})")

    heads = number("num_attention_heads")
    hidden = number("hidden_size")
    dtype_name = str(llm.get("torch_dtype") or config.get("torch_dtype") or "bfloat16")
    if dtype_name not in DTYPE_BYTES:
        raise UserError(f"{name}: unsupported torch_dtype {dtype_name!r}")
    return ModelSpec(
        name=name,
        num_layers=number("num_hidden_layers", "num_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=number("num_key_value_heads", default=heads),
        head_dim=number("head_dim", default=hidden // heads),
        intermediate_size=number("intermediate_size"),
        vocab_size=number("vocab_size"),
        dtype_bytes=DTYPE_BYTES[dtype_name],
        max_position_embeddings=number("max_position_embeddings", default=4096),
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        attention_bias=bool(llm.get("attention_bias", llm.get("bias", llm.get("model_type") == "qwen2"))),
        vision=_vision_tower(config, llm_hidden=hidden),
    )


def _vision_tower(config: dict[str, Any], *, llm_hidden: int) -> VisionTower | None:
    vision = config.get("vision_config")
    if not isinstance(vision, dict) or not vision.get("hidden_size"):
        return None
    hidden = int(vision["hidden_size"])
    # InternVL's projector: pixel shuffle folds 1/ratio² patches into one token, then LayerNorm + 2 Linear.
    ratio = float(config.get("downsample_ratio", 0.5))
    shuffled = int(hidden / (ratio * ratio))
    projector = 2 * shuffled + shuffled * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden
    return VisionTower(
        hidden_size=hidden,
        intermediate_size=int(vision.get("intermediate_size", 4 * hidden)),
        num_layers=int(vision.get("num_hidden_layers", 0)),
        projector_params=projector,
    )
