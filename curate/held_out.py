"""Evaluating a fine-tuned model on held-out question/answer rows: answer NLL and GSM8K exact match.

- NLL: the mean negative log-likelihood per answer token (the assistant turn and its end-of-turn token), with the
  model's own chat template, scored by the same exact scorer as `curate score`; and the same over the final answer's
  tokens alone (after `####`), the part token pruning can teach a model to get wrong.
- Exact match: greedy, batched generation from the chat-templated question; the predicted number is the one
  after the last `####`, else the last number in the text; the gold number is the one after `####`.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import numpy as np

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> Fraction | None:
    """The number a GSM8K-style answer ends with: after the last `####`, else the last number; None when none."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    pick = found[0] if "####" in text else found[-1]
    try:
        return Fraction(pick.replace(",", "").replace("$", ""))
    except (ValueError, ZeroDivisionError):
        return None


def exact_match(prediction: str, gold: str) -> bool:
    want = parse_number(gold)
    return want is not None and parse_number(prediction) == want


def eval_rows(path: Path, fields: str | None, limit: int | None, skip: int = 0) -> list[dict]:
    """The first `limit` usable rows after the first `skip` as {id, messages}; the answer is the last assistant
    turn."""
    from .formats import Sample, parse_fields, read_samples

    rows, usable = [], 0
    for s in read_samples(path, fields=parse_fields(fields)):
        if isinstance(s, Sample):
            usable += 1
            if usable <= skip:
                continue
            rows.append({"id": s.id, "messages": s.messages})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def final_answer_tokens(encoder, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(trainable mask, final-answer mask) over the conversation's tokens: the final answer is what follows the
    last `####` of the answer (GSM8K's `#### 624` line, its number), or the last `\\boxed{}`."""
    from .units import protected_spans, tokens_touching

    encoded = encoder.encode(messages)
    rendered = encoder.render(messages)
    _, starts, ends = encoder.tokenize(rendered.text)
    n = len(encoded.input_ids)
    spans = []
    for lo, hi, _ in protected_spans(rendered.text, rendered.contents[-1:], ("final-answer",)):
        head = rendered.text[lo:hi]
        skip = len(head) - len(head.lstrip("#").lstrip()) if head.startswith("####") else 0
        spans.append((lo + skip, hi, "final-answer"))
    final = tokens_touching(starts[:n], ends[:n], spans) & encoded.trainable.astype(bool)
    return encoded.trainable.astype(bool), final


def answer_nll(model_path: str, rows: list[dict], device: str = "auto") -> dict:
    """Mean NLL (nats) per answer token over `rows`, and over the final-answer tokens alone (the number after
    `####`: what token pruning must not teach a model to get wrong), with the token counts."""
    from .backends.hf import HFScorer
    from .models import load_tokenizer_from
    from .tokenization import ChatEncoder

    encoder = ChatEncoder(load_tokenizer_from(model_path, model_path))
    encoded = [encoder.encode(r["messages"]) for r in rows]
    masks = [final_answer_tokens(encoder, r["messages"]) for r in rows]
    scorer = HFScorer(model_path, dtype="float32", device=device)
    try:
        scores = scorer.score([e.input_ids for e in encoded])
    finally:
        scorer.close()
    total, count, final_total, final_count = 0.0, 0, 0.0, 0
    for (answer, final), (lp, _) in zip(masks, scores):
        lp = np.asarray(lp, dtype=np.float64)
        total -= float(lp[answer].sum())
        count += int(answer.sum())
        final_total -= float(lp[final].sum())
        final_count += int(final.sum())
    return {
        "nll": total / count,
        "answer_tokens": count,
        "final_nll": final_total / final_count if final_count else None,
        "final_tokens": final_count,
        "rows": len(rows),
    }


def generate_answers(
    model_path: str, rows: list[dict], max_new_tokens: int, batch_size: int, device: str = "auto"
) -> list[str]:
    """Greedy answers to each row's conversation minus its last (assistant) turn, batched by prompt length."""
    import torch
    from transformers import AutoModelForCausalLM

    from .backends import resolve_device
    from .models import load_tokenizer_from
    from .tokenization import ChatEncoder

    device = resolve_device(device)
    tokenizer = load_tokenizer_from(model_path, model_path)
    tokenizer.padding_side = "left"  # generation continues every row from its own last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    encoder = ChatEncoder(tokenizer)
    prompts = [encoder.prompt(r["messages"][:-1]) for r in rows]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc.to(device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            for i, seq in zip(batch, out[:, enc["input_ids"].shape[1] :]):
                answers[i] = tokenizer.decode(seq, skip_special_tokens=True)
    return answers


def gsm8k_em(model_path: str, rows: list[dict], max_new_tokens: int, batch_size: int, device: str = "auto") -> dict:
    answers = generate_answers(model_path, rows, max_new_tokens, batch_size, device)
    hits = [exact_match(a, r["messages"][-1]["content"]) for a, r in zip(answers, rows)]
    return {
        "em": sum(hits) / len(hits),
        "correct": sum(hits),
        "rows": len(rows),
        "examples": [
            {"id": r["id"], "answer": a[:400], "correct": h} for r, a, h in list(zip(rows, answers, hits))[:5]
        ],
    }
