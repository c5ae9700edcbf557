"""The simulated model's "tokenizer" and "generator": deterministic rules instead of a vocabulary.

Prompt tokens (documented, so that clients and tests can predict ``usage``):

- a text counts ``ceil(len(text) / 4)`` tokens (``len`` in Unicode code points, about four characters per
  token as for English with a BPE vocabulary); an empty text counts 0;
- ``/v1/completions``: one BOS token plus the prompt's tokens;
- ``/v1/chat/completions``: ``CHAT_PRIMING_TOKENS`` (the assistant turn the template opens) plus, per
  message, ``CHAT_MESSAGE_TOKENS`` (role and separators of the chat template) and its content's tokens;
  a content part of type ``image_url`` counts ``IMAGE_TOKENS`` (InternVL's 256 tokens per image tile).

Generated text is filler: the words of ``FILLER_TOKENS``, one word per token, cycling. When the request does
not set ``ignore_eos`` the model "emits EOS" after ``natural_length(prompt)`` tokens, a deterministic number
between ``NATURAL_MIN_TOKENS`` and ``NATURAL_MAX_TOKENS`` derived from the prompt text (CRC-32). ``stop``
strings cut the text where they first occur in the filler, as a real stop sequence would.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

CHARS_PER_TOKEN = 4
COMPLETION_BOS_TOKENS = 1
CHAT_PRIMING_TOKENS = 3
CHAT_MESSAGE_TOKENS = 4
IMAGE_TOKENS = 256
NATURAL_MIN_TOKENS = 16
NATURAL_MAX_TOKENS = 512

_FILLER_SENTENCE = (
    "This is simulated output from the tpgate engine , which models LMDeploy on a GPU without running a model ."
)


def _filler_tokens(sentence: str) -> tuple[str, ...]:
    """One token per word, with its leading space; the cycle ends with a space so that it repeats cleanly."""
    words = sentence.split()
    tokens = [("" if i == 0 or word in {",", "."} else " ") + word for i, word in enumerate(words)]
    tokens[-1] += " "
    return tuple(tokens)


FILLER_TOKENS = _filler_tokens(_FILLER_SENTENCE)
_CYCLE_TEXT = "".join(FILLER_TOKENS)
_STARTS = (0, *accumulate(len(t) for t in FILLER_TOKENS))  # offset of each token within one cycle


def text_tokens(text: str) -> int:
    """Tokens of a text under the simulator's rule: ``ceil(len(text) / 4)``."""
    return -(-len(text) // CHARS_PER_TOKEN)


def completion_prompt_tokens(prompt: str) -> int:
    return COMPLETION_BOS_TOKENS + text_tokens(prompt)


def chat_prompt_tokens(messages: Sequence[tuple[Sequence[str], int]]) -> int:
    """``messages``: for each message, its text pieces and its number of images."""
    total = CHAT_PRIMING_TOKENS
    for texts, images in messages:
        total += CHAT_MESSAGE_TOKENS + sum(text_tokens(t) for t in texts) + images * IMAGE_TOKENS
    return total


def text_for_tokens(tokens: int) -> str:
    """A prompt text that counts exactly ``tokens`` tokens under :func:`text_tokens`."""
    return "x" * (tokens * CHARS_PER_TOKEN)


def natural_length(prompt_key: str) -> int:
    """Where the model would emit EOS for this prompt (tokens), the same every time."""
    span = NATURAL_MAX_TOKENS - NATURAL_MIN_TOKENS + 1
    return NATURAL_MIN_TOKENS + zlib.crc32(prompt_key.encode()) % span


def filler_offset(token_index: int) -> int:
    """Character offset at which generated token ``token_index`` starts."""
    cycles, index = divmod(token_index, len(FILLER_TOKENS))
    return cycles * len(_CYCLE_TEXT) + _STARTS[index]


def filler_text(start_token: int, end_token: int, *, limit_chars: int | None = None) -> str:
    """The text of generated tokens ``[start_token, end_token)``, cut at ``limit_chars`` of the whole output."""
    n = len(FILLER_TOKENS)
    text = "".join(FILLER_TOKENS[i % n] for i in range(start_token, end_token))
    if limit_chars is not None:
        text = text[: max(0, limit_chars - filler_offset(start_token))]
    return text


@dataclass(frozen=True)
class GenerationPlan:
    """What a request will produce: how many tokens, why it stops, and where its text is cut (stop string)."""

    output_tokens: int
    finish_reason: str  # "stop" or "length"
    text_chars: int | None = None  # None: the whole filler of output_tokens


def plan_generation(*, max_new_tokens: int, ignore_eos: bool, stop: Sequence[str], prompt_key: str) -> GenerationPlan:
    """Decide the output length: ``max_new_tokens``, or earlier at the natural EOS or a stop string."""
    tokens, reason = max_new_tokens, "length"
    if not ignore_eos:
        natural = natural_length(prompt_key)
        if natural <= tokens:
            tokens, reason = natural, "stop"
    stops = [s for s in stop if s]
    if not stops:
        return GenerationPlan(tokens, reason)
    text = filler_text(0, tokens)
    hits = [pos for pos in (text.find(s) for s in stops) if pos >= 0]
    if not hits:
        return GenerationPlan(tokens, reason)
    cut = min(hits)
    # The token in which the stop string starts is the last one generated.
    last = next(i for i in range(tokens) if filler_offset(i + 1) > cut)
    return GenerationPlan(last + 1, "stop", text_chars=cut)
