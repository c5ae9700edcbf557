"""Prompts of a requested token length, generated deterministically from a seed.

The length is what the engine reports as ``usage.prompt_tokens`` (and counts in ``lmdeploy:prompt_tokens_total``),
template included. The simulated engine (:mod:`gateway.engines.sim.text`) counts ``ceil(characters / 4)``
tokens of text, plus a fixed template overhead per API; a prompt here is a four-letter word followed by
three-letter words, each with its leading space — four characters per word — so the simulator counts exactly
one token per word, and real tokenizers (Llama, Qwen, InternLM), which encode such common short words with
their leading space as one token each, count about the same. Every prompt draws its words from its own seed,
so prefix caching cannot make one request cheaper than another.
"""

from __future__ import annotations

import random
from typing import Literal

from gateway.engines.sim.text import (
    CHAT_MESSAGE_TOKENS,
    CHAT_PRIMING_TOKENS,
    COMPLETION_BOS_TOKENS,
    text_tokens,
)

# Template tokens the engine adds to the text: the chat template of one user message, or the BOS token.
TEMPLATE_TOKENS = {"chat": CHAT_PRIMING_TOKENS + CHAT_MESSAGE_TOKENS, "completions": COMPLETION_BOS_TOKENS}

# Four-letter words to start with, then three-letter words (each sent with its leading space).
_FIRST_WORD_TEXT = "Read Take Note Here Then What When This Keep Tell Give Look Find Make Show Each"
_WORD_TEXT = (
    "the and for you are was his her but not all any can had one our out day get has him how man new now "
    "old see two way who boy did its let put say she too use big box car cat dog eat end far fun hat hot "
    "job key lot map net pen red run sea set sit sun top win yes yet air art ask bad bed cup cut eye few "
    "fly law leg low may oil pay sky son tea ten try war age ago arm bag bit buy dry egg fit gas ice lay "
    "lie mix mud nor odd own pet raw row sad sum tie tin toe van wet"
)
FIRST_WORDS = tuple(_FIRST_WORD_TEXT.split())
WORDS = tuple(_WORD_TEXT.split())


def make_text(n_tokens: int, *, seed: int | str) -> str:
    """A text of exactly ``n_tokens`` tokens under the simulator's rule (``n_tokens`` words), the same for the
    same seed."""
    if n_tokens < 1:
        raise ValueError(f"a text needs at least one token (got {n_tokens})")
    # every word is 4 characters long with its separator: one simulator token each (tests check the lists)
    rng = random.Random(f"prompt:{seed}")
    return rng.choice(FIRST_WORDS) + "".join(" " + word for word in rng.choices(WORDS, k=n_tokens - 1))


def make_prompt(prompt_tokens: int, *, api: Literal["chat", "completions"], seed: int | str) -> str:
    """The text to send so that the engine counts ``prompt_tokens`` prompt tokens, template included.

    Below the template's own size (8 tokens for chat, 2 for completions) the text is one token and the engine
    counts the minimum instead.
    """
    return make_text(max(1, prompt_tokens - TEMPLATE_TOKENS[api]), seed=seed)


def engine_prompt_tokens(text: str, *, api: Literal["chat", "completions"]) -> int:
    """Prompt tokens the simulated engine counts for ``text`` sent as one user message or one prompt."""
    return TEMPLATE_TOKENS[api] + text_tokens(text)
