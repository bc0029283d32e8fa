from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from curate.errors import RowError
from curate.formats import Sample, read_samples
from curate.tokenization import encode, ensure_chat_template, renders_tools, template_inputs

from .conftest import ALPACA, GLAIVE, GSM8K_TEST, build_tiny_tokenizer, needs_shared


def spans(mask):
    d = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.where(d == 1)[0], np.where(d == -1)[0]))


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@needs_shared
@pytest.mark.parametrize("path,n", [(ALPACA, 150), (GSM8K_TEST, 150), (GLAIVE, 300)])
def test_trainable_tokens_decode_to_assistant_turns(smol_tokenizer, path, n):
    """Every contiguous trainable span is exactly one assistant turn followed by its <|im_end|>."""
    checked = 0
    for s in islice((s for s in read_samples(Path(path)) if isinstance(s, Sample)), n):
        enc = encode(smol_tokenizer, s.messages)
        assistant = [m["content"] for m in s.messages if m["role"] == "assistant"]
        decoded = [smol_tokenizer.decode(enc.input_ids[a:b]) for a, b in spans(enc.trainable)]
        assert decoded == [c + "<|im_end|>" for c in assistant], s.id
        # the ids are what apply_chat_template itself produces (a leading `tools` message becomes system text)
        messages, tools = template_inputs(s.messages, renders_tools(smol_tokenizer))
        ref = smol_tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"]
        assert enc.input_ids.tolist() == list(ref)
        checked += 1
    assert checked == n


def test_fallback_template_warns_and_masks_assistant():
    tok = build_tiny_tokenizer(chat_template=None)
    with pytest.warns(UserWarning, match="ChatML fallback"):
        assert ensure_chat_template(tok) is True
    msgs = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "jumps over"}]
    enc = encode(tok, msgs)
    ((a, b),) = spans(enc.trainable)
    assert tok.decode(enc.input_ids[a:b]) == "jumps over<|im_end|>"


def test_truncation_flags_and_rejects_rows_without_trainable_tokens():
    tok = build_tiny_tokenizer()
    msgs = [{"role": "user", "content": "the quick brown fox " * 10}, {"role": "assistant", "content": "dog"}]
    full = encode(tok, msgs)
    assert not full.truncated and full.trainable.sum() > 0
    cut = encode(
        tok,
        msgs + [{"role": "user", "content": "more"}, {"role": "assistant", "content": "lazy dog"}],
        max_length=len(full.input_ids),
    )
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids)
    with pytest.raises(RowError) as e:
        encode(tok, msgs, max_length=10)
    assert e.value.reason == "no_trainable_tokens"
