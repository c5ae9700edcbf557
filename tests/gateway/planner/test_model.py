import json

import pytest

from gateway.errors import UserError
from gateway.planner import bundled_cards, load_model, model_from_config

LLAMA_LIKE = {
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize(
    ("card", "billions"),
    [
        ("llama-2-7b", 6.74),
        ("llama-2-70b", 68.98),
        ("llama-3-8b", 8.03),
        ("llama-3-70b", 70.55),
        ("qwen2_5-7b", 7.62),
        ("qwen2_5-72b", 72.71),
        ("internlm-20b", 20.09),
        ("internvl2_5-38b", 38.38),
    ],
)
def test_bundled_cards_match_published_parameter_counts(card, billions):
    assert load_model(card).param_count / 1e9 == pytest.approx(billions, abs=0.02)


def test_every_required_card_is_bundled():
    assert {"internvl2_5-38b", "llama-2-7b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "qwen2_5-7b",
            "qwen2_5-72b", "internlm-20b"} <= set(bundled_cards())


@pytest.mark.parametrize("key", ["llm_config", "text_config", "language_config"])
def test_nested_language_model_is_found(key):
    model = model_from_config({"architectures": ["Wrapper"], key: LLAMA_LIKE}, name="nested")
    assert (model.num_attention_heads, model.num_kv_heads, model.num_layers) == (32, 8, 32)


def test_top_level_wins_over_nested():
    config = {**LLAMA_LIKE, "text_config": {**LLAMA_LIKE, "num_attention_heads": 64}}
    assert model_from_config(config, name="m").num_attention_heads == 32


def test_internvl_nests_its_llm_and_adds_the_vision_tower():
    model = load_model("internvl2_5-38b")
    assert (model.num_attention_heads, model.num_kv_heads, model.num_layers, model.hidden_size) == (40, 8, 64, 5120)
    assert model.vision is not None
    # InternViT-6B is about 5.5 B parameters; the projector maps 4 x 3200 features to 5120.
    assert model.vision.param_count / 1e9 == pytest.approx(5.6, abs=0.15)
    assert model.param_count == model.llm_param_count + model.vision.param_count


def test_derived_shape_and_bytes():
    model = model_from_config(LLAMA_LIKE, name="llama3")
    assert model.head_dim == 128
    assert model.dtype_bytes == 2
    assert model.weight_bytes == 2 * model.param_count


def test_missing_kv_heads_means_multi_head_attention():
    config = {k: v for k, v in LLAMA_LIKE.items() if k != "num_key_value_heads"}
    assert model_from_config(config, name="mha").num_kv_heads == 32


@pytest.mark.parametrize(("quant_policy", "element_bytes"), [(0, 2.0), (8, 1.0), (4, 0.5)])
def test_kv_cache_bytes_per_token(quant_policy, element_bytes):
    model = model_from_config(LLAMA_LIKE, name="llama3")
    # K and V, 32 layers, 8 KV heads of 128 dims
    assert model.kv_cache_bytes_per_token(quant_policy) == 2 * 32 * 8 * 128 * element_bytes


def test_kv_cache_of_internvl_38b_is_256_kib_per_token():
    assert load_model("internvl2_5-38b").kv_cache_bytes_per_token() == 256 * 1024


def test_unknown_quant_policy_is_refused():
    with pytest.raises(UserError, match="quant_policy must be 0, 4 or 8, not 2"):
        model_from_config(LLAMA_LIKE, name="m").kv_cache_bytes_per_token(2)


def test_model_directory_and_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_LIKE))
    assert load_model(str(tmp_path)).num_attention_heads == 32
    assert load_model(str(tmp_path / "config.json")).num_kv_heads == 8


def test_directory_without_config_json(tmp_path):
    with pytest.raises(UserError, match="model directory has no config.json"):
        load_model(str(tmp_path))


def test_malformed_config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="malformed config.json"):
        load_model(str(path))


def test_config_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="must hold a JSON object"):
        load_model(str(path))


def test_config_without_head_counts(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 4096, "llm_config": {"hidden_size": 4096}}))
    with pytest.raises(UserError, match="no 'num_attention_heads'"):
        load_model(str(path))


def test_non_integer_field_is_named():
    with pytest.raises(UserError, match="'num_hidden_layers' must be a positive integer"):
        model_from_config({**LLAMA_LIKE, "num_hidden_layers": "32"}, name="m")


def test_unknown_card():
    with pytest.raises(UserError, match="unknown model 'gpt-9'.*llama-2-7b"):
        load_model("gpt-9")
