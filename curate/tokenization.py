"""Chat template -> input_ids and the `trainable` mask, for any number of turns.

Assistant spans are found by rendering prefixes of the conversation as text (the template decides where a
turn starts and ends, we never guess special tokens) and mapping those character spans onto the tokens of
the full rendering with the fast tokenizer's offsets.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import CurateError, RowError

# ChatML, used (with a warning) when the tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # int32, [n_tokens]
    trainable: np.ndarray  # int8, [n_tokens]; 1 on assistant tokens and each assistant end-of-turn token
    truncated: bool


def ensure_chat_template(tokenizer) -> bool:
    """Give a template-less tokenizer the documented ChatML fallback. Returns True when it did."""
    if getattr(tokenizer, "chat_template", None):
        return False
    warnings.warn(
        "the tokenizer has no chat template; using the ChatML fallback "
        "(<|im_start|>role\\ncontent<|im_end|>). Pass a model with a chat template for faithful scores.",
        stacklevel=2,
    )
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def chat_template_hash(tokenizer) -> str:
    return hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:16]


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and, for every assistant turn, its [start, end) character span.

    A span runs from the end of the generation prompt to the end of that turn's rendering, trailing
    whitespace removed (the newline after `<|im_end|>` is layout, not something the model says).
    """
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(before) or not full.startswith(through) or not through.startswith(before):
            raise CurateError(
                "the chat template is not prefix-stable (rendering the first turns is not a prefix of "
                "rendering the whole conversation), so assistant tokens cannot be located reliably"
            )
        end = len(through.rstrip())
        spans.append((len(before), end))
    return full, spans


def encode(tokenizer, messages: list[dict[str, str]], max_length: int | None = None) -> Encoded:
    """Tokenise one conversation. Raises RowError('no_trainable_tokens') when nothing is left to train on."""
    text, spans = assistant_char_spans(tokenizer, messages)
    # add_special_tokens=False: templates write BOS themselves, as apply_chat_template(tokenize=True) does.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    trainable = np.zeros(len(ids), dtype=np.int8)
    for lo, hi in spans:
        trainable[(starts >= lo) & (starts < hi)] = 1
    trainable[0] = 0  # nothing predicts the first token, so it cannot be scored or trained on
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, trainable = ids[:max_length], trainable[:max_length]
    if not trainable.any():
        why = "after truncation to --max-length" if truncated else "after tokenisation"
        raise RowError("no_trainable_tokens", f"no assistant token left {why}")
    return Encoded(ids, trainable, truncated)
