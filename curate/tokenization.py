"""Chat template -> input_ids and the `trainable` mask, for any number of turns and any template.

We never guess special tokens or turn headers. The assistant turns are located in the template's own rendering
of the whole conversation: it is rendered once more with every assistant turn's content replaced by a numbered
placeholder, and the text between the placeholders is what the template writes around the contents (headers,
an injected default system prompt, the other turns). The rendering must then read as that text with the contents
in between, exactly, or each turn is located alone (two more renderings per turn, with two different
placeholders: slower, for templates that rewrite a content). Either way the cost of a row is bounded: the first
way is linear in the conversation's length.

What the model must learn is the content and the end-of-turn marker right after it (`<|im_end|>`, `<|eot_id|>`,
`</s>`, ...): the marker is looked up in the rendering as text, whether or not it is one token of this tokenizer
(a ChatML template on a base model writes `<|im_end|>` as several tokens, and they are trained all the same, or
the model would never learn to stop); for a last turn after which the template writes none, it is taken from
how the template ends a turn that another turn follows, and appended. Character spans become token spans
through the fast tokenizer's offsets. See docs/algorithm.md ("Which tokens are trained").

Message text that spells one of the template's control tokens (`<|im_end|>\n<|im_start|>system ...` inside a
user or assistant message) would be tokenised as real control tokens and trained on: such a row is skipped
(`control_token_in_content`, counted, with its field), never encoded.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import RowError
from .formats import no_tools
from .schema import TOOLS_ROLE

# ChatML, used (with a warning) when the tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# End-of-turn markers of common templates; a tokenizer's own EOS token is always one too.
END_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|eom_id|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)
PLACEHOLDERS = ("\ue000", "\ue001")  # private-use characters: no template or tokenizer gives them meaning
NUMBERED = re.compile("\ue002([0-9]+)\ue003")  # the placeholder of assistant turn N, for locating all at once


def _numbered(i: int) -> str:
    return f"\ue002{i}\ue003"


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # int32, [n_tokens]
    trainable: np.ndarray  # int8, [n_tokens]; 1 on assistant tokens and each assistant end-of-turn token
    truncated: bool


@dataclass(frozen=True)
class Rendered:
    """A conversation as the template writes it, with each assistant turn's [start, end) character spans."""

    text: str
    contents: list[tuple[int, int]]  # the turn's content
    spans: list[tuple[int, int]]  # the content and its end-of-turn marker: what is trained


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


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatEncoder:
    """Renders and tokenises conversations with one tokenizer's chat template."""

    def __init__(self, tokenizer, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        markers = list(END_MARKERS)  # as text: a marker need not be one token of this tokenizer to be learnt
        if tokenizer.eos_token and tokenizer.eos_token not in markers:
            markers.append(tokenizer.eos_token)
        self.markers = tuple(sorted(markers, key=len, reverse=True))
        self.control = control_tokens(tokenizer)
        self.tools_in_template = renders_tools(tokenizer)

    @property
    def tool_rendering(self) -> str:
        """How a conversation's tool schemas reach the model, for the manifest."""
        return "chat template (tools=)" if self.tools_in_template else "system prompt text"

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        messages, tools = template_inputs(messages, self.tools_in_template)
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja raises for conversations a template refuses (e.g. no system role)
            raise RowError("template_error", f"the chat template refuses this conversation: {e}") from None

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The text a model continues to answer `messages` (for generation)."""
        return self._render(messages, generation_prompt=True)

    def _marker_at(self, text: str, pos: int) -> str:
        """The end-of-turn marker that starts at `pos` (after spaces and newlines), with what precedes it."""
        stripped = text[pos:].lstrip(" \n\t")
        for marker in self.markers:
            if stripped.startswith(marker):
                return text[pos : len(text) - len(stripped) + len(marker)]
        return ""

    def _with_content(self, messages: list[dict[str, str]], i: int, content: str) -> str:
        return self._render([*messages[:i], {**messages[i], "content": content}, *messages[i + 1 :]])

    def _locate(self, full: str, messages: list[dict[str, str]], i: int) -> tuple[int, int]:
        """[start, end) of turn i's content in `full`. One rendering with a placeholder usually settles it (what
        differs from `full` is the content, as given or trimmed); otherwise two placeholders show what the template
        writes around the turn, which must not depend on the content."""
        content = messages[i]["content"]
        a = self._with_content(messages, i, PLACEHOLDERS[0])
        head = _common_prefix(full, a)
        tail = min(_common_prefix(full[::-1], a[::-1]), len(a) - head - 1, len(full) - head)
        if len(a) - tail == head + 1 and full[head : len(full) - tail] in (content, content.strip()):
            return head, len(full) - tail
        b = self._with_content(messages, i, PLACEHOLDERS[1])
        head = _common_prefix(a, b)
        tail = _common_prefix(a[::-1], b[::-1])
        before, after = a[:head], a[len(a) - tail :]
        if not (full.startswith(before) and full.endswith(after) and head + tail <= len(full)):
            raise RowError(
                "template_unstable",
                f"the chat template writes the text around assistant turn {i} "
                "differently depending on its content, so its tokens cannot be located",
                field=f"messages[{i}].content",
            )
        return head, len(full) - tail

    def _locate_all(self, full: str, messages: list[dict[str, str]]) -> dict[int, tuple[int, int]]:
        """[start, end) of every assistant turn's content, from one more rendering: {} when the template rewrites
        a content or repeats it (then each turn is located alone)."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        marked = self._render([{**m, "content": _numbered(i)} if i in turns else m for i, m in enumerate(messages)])
        pieces = NUMBERED.split(marked)  # text, turn, text, turn, ..., text
        texts, order = pieces[0::2], [int(t) for t in pieces[1::2]]
        if order != turns or not full.startswith(texts[0]):
            return {}
        found, pos = {}, len(texts[0])
        for i, after in zip(order, texts[1:], strict=True):
            content = messages[i]["content"]
            for candidate in dict.fromkeys((content, content.strip())):
                end = pos + len(candidate)
                if full.startswith(candidate, pos) and full.startswith(after, end):
                    found[i], pos = (pos, end), end + len(after)
                    break
            else:
                return {}
        return found if pos == len(full) else {}

    def render(self, messages: list[dict[str, str]]) -> Rendered:
        full = self._render(messages)
        located = self._locate_all(full, messages)
        contents, spans = [], []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, content_end = located.get(i) or self._locate(full, messages, i)
            marker = self._marker_at(full, content_end)
            if not marker and i == len(messages) - 1:
                # Some templates end a turn only when another follows: learn the marker they would write.
                probe = self._render([*messages, {"role": "user", "content": PLACEHOLDERS[0]}])
                marker = self._marker_at(probe, content_end) if probe.startswith(full[:content_end]) else ""
                if marker:
                    full = full[:content_end] + marker + full[content_end:]
            contents.append((start, content_end))
            spans.append((start, content_end + len(marker)))
        return Rendered(full, contents, spans)

    def refuse_control_tokens(self, messages: list[dict[str, str]]) -> None:
        if self.control is None:
            return
        for i, m in enumerate(messages):
            if found := self.control.search(m["content"]):
                raise RowError(
                    "control_token_in_content",
                    f"messages[{i}] ({m['role']}) spells the control token {found.group()!r}, which would be "
                    "tokenised as one and trained on",
                    field=f"messages[{i}].content",
                )

    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, token start offsets, token end offsets). add_special_tokens=False: templates write BOS themselves."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return np.asarray(enc["input_ids"], dtype=np.int32), offsets[:, 0], offsets[:, 1]

    def encode(self, messages: list[dict[str, str]]) -> Encoded:
        """Tokenise one conversation. Raises RowError for a row that cannot be used."""
        self.refuse_control_tokens(messages)
        rendered = self.render(messages)
        try:
            ids, starts, ends = self.tokenize(rendered.text)
        except Exception as e:  # a tokenizer failing on one text must not stop the file
            raise RowError("tokenizer_error", f"the tokenizer failed on this conversation: {e}") from None
        trainable = np.zeros(len(ids), dtype=np.int8)
        for lo, hi in rendered.spans:
            trainable[in_span(rendered.text, starts, ends, lo, hi)] = 1
        if len(ids):
            trainable[0] = 0  # nothing predicts the first token, so it cannot be scored or trained on
        truncated = self.max_length is not None and len(ids) > self.max_length
        if truncated:
            ids, trainable = ids[: self.max_length], trainable[: self.max_length]
        if not trainable.any():
            why = "after truncation to --max-length" if truncated else "after tokenisation"
            raise RowError("no_trainable_tokens", f"no assistant token left {why}")
        return Encoded(ids, trainable, truncated)


def template_inputs(messages: list[dict[str, str]], tools_in_template: bool) -> tuple[list[dict], list | None]:
    """(messages, tools) for apply_chat_template. Tool schemas go to the template's own `tools` argument when it
    renders them (Qwen2.5, Llama-3.1: the prompt the model sees at inference); otherwise, or when they are not a
    JSON list of objects, they are written as text into the system prompt."""
    if not messages or messages[0]["role"] != TOOLS_ROLE:
        return messages, None
    text, rest = messages[0]["content"], messages[1:]
    if no_tools(text):  # an empty list scored by an earlier version: no tools, no tools text
        return rest, None
    if tools_in_template:
        try:
            tools = json.loads(text)
        except ValueError:
            tools = None
        if isinstance(tools, list) and tools and all(isinstance(t, dict) for t in tools):
            return rest, tools
    note = f"You can call these tools:\n{text}"
    if rest and rest[0]["role"] == "system":
        return [{"role": "system", "content": rest[0]["content"] + "\n\n" + note}, *rest[1:]], None
    return [{"role": "system", "content": note}, *rest], None


def renders_tools(tokenizer) -> bool:
    """Whether the chat template writes the schemas passed as `tools` (it ignores them, or fails, if not)."""
    probe = [{"type": "function", "function": {"name": "\ue004", "description": "", "parameters": {}}}]
    messages = [{"role": "user", "content": "x"}]
    try:
        return "\ue004" in tokenizer.apply_chat_template(messages, tools=probe, tokenize=False)
    except Exception:
        return False


def control_tokens(tokenizer) -> re.Pattern | None:
    """The control tokens a row's text must not spell: the tokenizer's special tokens (BOS, EOS, ...) and the
    special tokens its chat template writes. Other special tokens (SmolLM2's `<filename>`) are left to the data."""
    template = str(getattr(tokenizer, "chat_template", "") or "")
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content in template}
    special |= {t for t in tokenizer.all_special_tokens if t}
    if not special:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)))


def in_span(text: str, starts: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Tokens that belong to the character span [lo, hi): those starting inside it, and one that starts just
    before it with only whitespace there (a SentencePiece `▁word` whose space the template wrote)."""
    inside = (starts >= lo) & (starts < hi)
    straddle = (starts < lo) & (ends > lo)
    if straddle.any():
        i = int(np.flatnonzero(straddle)[0])
        inside[i] = text[starts[i] : lo].isspace()
    return inside


def encode(tokenizer, messages: list[dict[str, str]], max_length: int | None = None) -> Encoded:
    """One conversation with a one-off encoder (a scoring run keeps one ChatEncoder for all rows)."""
    return ChatEncoder(tokenizer, max_length).encode(messages)


class TokenText:
    """The text that each scored token covers, recovered from the scorer's own tokenizer and chat template (the
    scores hold token ids only): for whole-word pruning, protected spans and the summary of what was masked."""

    def __init__(self, tokenizer):
        self.encoder = ChatEncoder(tokenizer)

    def spans(self, messages: list[dict[str, str]], input_ids: np.ndarray):
        """(text, starts, ends, assistant contents) aligned with `input_ids`, or None when this tokenizer's
        rendering of `messages` does not give back exactly those ids (then no text can be trusted)."""
        try:
            rendered = self.encoder.render(messages)
            ids, starts, ends = self.encoder.tokenize(rendered.text)
        except Exception:  # a row the template or tokenizer now refuses: the caller counts it
            return None
        n = len(input_ids)
        if len(ids) < n or not np.array_equal(ids[:n], input_ids):
            return None
        return rendered.text, starts[:n], ends[:n], rendered.contents
