import json

import pytest

from gateway.engines.sim.protocol import ServingContext, parse_chat, parse_completion
from loadtests.prompts import FIRST_WORDS, TEMPLATE_TOKENS, WORDS, engine_prompt_tokens, make_prompt, make_text

ENGINE = ServingContext(served_model="m", session_len=100_000, vocab_size=32_000, multimodal=False)


def sim_prompt_tokens(api, text):
    """What the simulated engine's own request parser counts for this text."""
    if api == "chat":
        body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
        return parse_chat(json.dumps(body).encode(), ENGINE).prompt_tokens
    body = {"model": "m", "prompt": text, "max_tokens": 1}
    return parse_completion(json.dumps(body).encode(), ENGINE).prompt_tokens


def test_words_are_four_characters_with_their_separator():
    assert all(len(word) == 4 and word.isalpha() for word in FIRST_WORDS)
    assert all(len(word) == 3 and word.isalpha() for word in WORDS)
    assert len(set(WORDS)) == len(WORDS) > 100


@pytest.mark.parametrize("n_tokens", [1, 2, 3, 7, 100, 1000, 8000])
def test_text_has_one_word_per_token(n_tokens):
    text = make_text(n_tokens, seed=3)
    assert len(text.split()) == n_tokens
    assert len(text) == 4 * n_tokens


@pytest.mark.parametrize("api", ["chat", "completions"])
@pytest.mark.parametrize("prompt_tokens", [TEMPLATE_TOKENS["chat"] + 1, 50, 247, 1000, 8000])
def test_the_simulated_engine_counts_exactly_the_requested_tokens(api, prompt_tokens):
    text = make_prompt(prompt_tokens, api=api, seed=f"s:{prompt_tokens}")
    assert sim_prompt_tokens(api, text) == prompt_tokens
    assert engine_prompt_tokens(text, api=api) == prompt_tokens


def test_below_the_template_size_the_engine_counts_its_minimum():
    text = make_prompt(3, api="chat", seed=0)
    assert sim_prompt_tokens("chat", text) == TEMPLATE_TOKENS["chat"] + 1


def test_prompts_are_deterministic_per_seed_and_differ_between_seeds():
    assert make_prompt(500, api="chat", seed="1:7") == make_prompt(500, api="chat", seed="1:7")
    first_words = {make_prompt(500, api="chat", seed=f"1:{i}")[:40] for i in range(50)}
    assert len(first_words) == 50  # distinct prefixes: no request rides on another's prefix cache


def test_zero_tokens_is_refused():
    with pytest.raises(ValueError, match="at least one token"):
        make_text(0, seed=1)
