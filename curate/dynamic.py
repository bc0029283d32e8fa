"""Q-Tuning inside the trainer: the paper's protocol, as a loss for transformers' `Trainer` and TRL's `SFTTrainer`.

Every sample of a micro-batch goes through the training forward; from that forward's own logits (detached: no
gradient flows through the scores) each sample gets its perplexity and mean entropy under the model being trained,
the micro-batch is triaged to max(1, round(ratio * B)) samples and the tokens of its Q2 samples are pruned, with the
same functions and options as `curate prune` (`pruning`, `strategies`, `masking`; the micro-batch is the batch of
`--scope batch`), and the loss is the mean cross-entropy of the kept tokens. No second forward: the cost is the
softmax's entropy over the vocabulary at the scored positions, and the triage.

`select_in_batch` is the core, a plain function of logits and labels that returns the loss and what it chose;
`QTuningLoss` wraps it as a `compute_loss_func` and keeps a tally for the logs; `with_qtuning(TrainerClass)` gives a
trainer that uses it in `compute_loss` (TRL 1.16 runs a second forward for a `compute_loss_func`) and logs the tally.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import masking, pruning, schema, strategies
from .config.selection import SelectionOptions
from .errors import CurateError

# Columns a strategy may read in a micro-batch: the coordinates and the loss tokens (IFD needs a pass of its own).
BATCH_COLUMNS = ("id", "ppl", "ent", "n_trainable")
ENTROPY_CHUNK = 512  # rows of [rows, vocab] at a time for the entropy, which needs no gradient
NEEDS_TEXT = (
    "whole-word units and protected spans read each token's text: pass {what}, or prune single tokens with nothing "
    "protected (token_unit='token', protect=[])"
)


@dataclass(frozen=True)
class BatchChoice:
    """What the triage of one micro-batch chose. Arrays are per sample (B) or per position (B, T), aligned with
    `labels`; a sample without a loss token has NaN coordinates and no selection."""

    loss: Any  # torch scalar with gradient: the mean cross-entropy of the kept tokens
    ppl: np.ndarray
    ent: np.ndarray
    selection: list  # Q2 / Q4 / fill-Q2 / fill-Q4 (or the strategy's name) per kept sample, None otherwise
    token_mask: np.ndarray  # int8 (B, T): 1 where the token is in the loss
    label_tokens: int  # tokens with a label in the micro-batch
    loss_tokens: int  # of them, those in the loss
    effect: Counter  # what token pruning removed (masking.mask_sample's counts)


def check_options(options: SelectionOptions) -> None:
    strategy = strategies.get(options.strategy)
    missing = [c for c in strategy.needs if c not in BATCH_COLUMNS]
    if missing:
        raise CurateError(
            f"strategy {options.strategy!r} reads {', '.join(missing)}, which a micro-batch does not have; inside "
            f"the trainer use one of: {', '.join(s.name for s in strategies.REGISTRY.values() if not s.signals)}"
        )


def token_statistics(logits, labels, attention_mask=None, entropy_positions: str = "response"):
    """(log-probs of the labelled tokens with their gradient, logprob, entropy): the first a torch vector over the
    positions with a label (row-major), the others float32 arrays (B, T) aligned with `labels` (position i holds the
    prediction of token i from logits[i - 1]; NaN where not computed). Entropy at the labelled positions, or with
    "all" at every attended position after the first (the official code's mean, prompt included)."""
    import torch

    token_logp, logp = labelled_log_probs(logits, labels)
    valid = labels[:, 1:] != schema.IGNORE_INDEX
    b, t = labels.shape
    logprob = np.full((b, t), np.nan, dtype=np.float32)
    entropy = np.full((b, t), np.nan, dtype=np.float32)
    where = valid.nonzero(as_tuple=True)
    logprob[where[0].cpu().numpy(), where[1].cpu().numpy() + 1] = token_logp.detach().float().cpu().numpy()
    with torch.no_grad():
        if entropy_positions == "all":
            if attention_mask is None:
                raise CurateError("entropy_positions 'all' needs the attention mask: use with_qtuning(Trainer)")
            attended = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
            where = attended.nonzero(as_tuple=True)
            values = _entropy(logits[:, :-1][attended], normalised=False)
        else:
            values = _entropy(logp.detach(), normalised=True)  # the loss's log-probs: no second softmax
        entropy[where[0].cpu().numpy(), where[1].cpu().numpy() + 1] = values.cpu().numpy()
    return token_logp, logprob, entropy


def labelled_log_probs(logits, labels):
    """(log-prob of each labelled token, with its gradient; the log-softmax rows they come from), at the labelled
    positions only, row-major: a causal LM's own loss upcasts and normalises the logits of every position, prompt and
    padding included."""
    import torch

    targets = labels[:, 1:]
    valid = targets != schema.IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1][valid].float(), dim=-1)
    return logp.gather(1, targets[valid].long().unsqueeze(1)).squeeze(1), logp


def _entropy(rows, normalised: bool):
    """Entropy (nats) of each row of log-probs (`normalised`) or logits, a chunk of rows at a time."""
    import torch

    out = []
    for chunk in rows.split(ENTROPY_CHUNK):
        lp = chunk if normalised else torch.log_softmax(chunk.float(), dim=-1)
        out.append(-(torch.exp(lp) * lp).sum(-1))
    return torch.cat(out) if out else rows.new_zeros(0, dtype=torch.float32)


def coordinates(logprob, entropy, trainable, attended, options: SelectionOptions, vocab_size: int):
    """The EU-plane coordinates of each sample (pruning.sample_coordinates and pruning.place, as prune computes them
    from scores): a polars frame id, ppl, ent, n_trainable, problem, in batch order."""
    import polars as pl

    rows = [np.flatnonzero(a) for a in attended]
    # the prompt's tokens have no label, so no log-prob here; they count only in the entropy ("all"), and the check of
    # every scored position must not take their absence for a broken score
    logprob = np.where(trainable, logprob, 0.0).astype(np.float32)
    frame = pl.DataFrame(
        {
            "id": [f"{i:05d}" for i in range(len(rows))],
            "n_tokens": [len(r) for r in rows],
            "trainable": [trainable[i, r].astype(np.int8) for i, r in enumerate(rows)],
            "logprob": [logprob[i, r] for i, r in enumerate(rows)],
            "entropy": [entropy[i, r] for i, r in enumerate(rows)],
        },
        schema={
            "id": pl.String,
            "n_tokens": pl.Int32,
            "trainable": pl.List(pl.Int8),
            "logprob": pl.List(pl.Float32),
            "entropy": pl.List(pl.Float32),
        },
    )
    positions = "all" if options.entropy_positions == "all" else "trainable"
    coords = pruning.sample_coordinates(frame, options.entropy_positions, vocab_size, positions)
    return pruning.place(coords, options.placement)


def select_in_batch(
    logits,
    labels,
    options: SelectionOptions,
    *,
    attention_mask=None,
    pieces=None,
    seed: int = 0,
) -> BatchChoice:
    """Triage one micro-batch and prune its tokens, from the logits of the training forward; returns the loss (mean
    cross-entropy of the kept tokens, with its gradient) and what was chosen.

    `pieces(ids) -> list[str]`: each token's text, for whole-word units and protected spans (`TokenPieces`);
    `seed`: the draw of the random strategies for this micro-batch.
    """
    import torch

    need_text = masking.needs_text(options)
    if need_text and pieces is None:  # else Q2 samples would keep every token, silently
        raise CurateError(NEEDS_TEXT.format(what="pieces=TokenPieces(tokenizer)"))
    token_logp, logprob, entropy = token_statistics(logits, labels, attention_mask, options.entropy_positions)
    ids = labels.detach().cpu().numpy()
    trainable = ids != schema.IGNORE_INDEX
    trainable[:, 0] = False  # the first token is predicted by nothing
    attended = np.ones_like(trainable) if attention_mask is None else attention_mask.detach().cpu().numpy() != 0
    attended |= trainable
    b = len(ids)
    coords = coordinates(logprob, entropy, trainable, attended, options, logits.shape[-1])
    problem = coords["problem"].to_list()
    broken = [i for i, p in enumerate(problem) if p and p != "has no trainable token"]
    if broken:
        raise CurateError(
            f"sample {broken[0]} of the micro-batch {problem[broken[0]]} under the model being trained: the training "
            "diverged (lower the learning rate, or train in float32)"
        )
    eligible = np.flatnonzero([p is None for p in problem])
    ppl, ent = (np.full(b, np.nan) for _ in range(2))
    ppl[eligible], ent[eligible] = coords["ppl"].to_numpy()[eligible], coords["ent"].to_numpy()[eligible]
    selection: list = [None] * b
    strategy = strategies.get(options.strategy)
    if len(eligible):
        columns = {
            "id": coords["id"].to_numpy().astype(str)[eligible],
            "ppl": ppl[eligible],
            "ent": ent[eligible],
            "n_trainable": coords["n_trainable"].to_numpy()[eligible],
        }
        triage = strategy.select(columns, pruning.budget(options.ratio, len(eligible)), seed, options.fill)
        for i, label in zip(eligible, triage.selection):
            selection[i] = label
    keep = np.zeros_like(ids, dtype=np.int8)
    effect = Counter()
    for i, label in enumerate(selection):
        if label is None:
            continue
        row = np.flatnonzero(attended[i])
        train_row = trainable[i, row].astype(np.int8)
        if strategy.tokens_pruned(label) and options.token_strategy != "none":
            view = masking.ids_view(pieces(ids[i, row]), train_row) if need_text else None
            mask = masking.mask_sample(logprob[i, row], train_row, False, view, f"{i:05d}", options, effect, seed)
        else:
            mask = train_row
        keep[i, row] = mask
    kept = torch.as_tensor(keep[:, 1:], device=labels.device)[labels[:, 1:] != schema.IGNORE_INDEX]
    kept = kept.to(token_logp.dtype)
    loss = -(token_logp * kept).sum() / kept.sum().clamp(min=1)
    return BatchChoice(loss, ppl, ent, selection, keep, int(trainable.sum()), int(keep.sum()), effect)


class TokenPieces:
    """Each token id's own text under a tokenizer, cached: what whole-word units and protected spans read in a
    trainer, which sees ids only."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids) -> list[str]:
        out = []
        for i in ids.tolist():
            if i not in self.cache:
                self.cache[i] = self.text(i) if i >= 0 else ""
            out.append(self.cache[i])
        return out

    def text(self, i: int) -> str:
        text = self.tokenizer.decode([i], clean_up_tokenization_spaces=False)
        # SentencePiece tokenizers (Llama, Mistral, Gemma) mark a word's leading space with "▁" and drop it when a
        # token is decoded alone; without it, the words of a reply would run together into one unit
        if (self.tokenizer.convert_ids_to_tokens(i) or "").startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        return text


class QTuningLoss:
    """The in-trainer loss: `Trainer(..., compute_loss_func=QTuningLoss(tokenizer=tok, ratio=0.25))`, or through
    `with_qtuning`. Options are prune's (`SelectionOptions`: ratio, token_ratio, preset, strategy, token_strategy,
    ...), with prune's defaults; `seed` draws the random strategies (a new draw every micro-batch). The tally of
    what was kept since the last log is `take_tally()`.

    The loss is the mean over each micro-batch's kept tokens, as in the paper's code. `with_qtuning` trains with it
    as it is meant to: with gradient accumulation, on several processes, a plain loss in evaluation, a refusal of
    packed rows, and the same draws after a resume. As a bare `compute_loss_func` the Trainer also calls it in
    evaluation (eval_loss is then the selected samples' loss), with gradient accumulation it needs
    `loss_is_scaled_for_ga = False` on the trainer (read from transformers 5.19) and on several GPUs
    `average_tokens_across_devices=False`, since the Trainer otherwise treats it as a sum over the labelled tokens.
    On several processes the tally counts this process's micro-batches."""

    def __init__(self, tokenizer=None, seed: int = 0, options: SelectionOptions | None = None, **values):
        if options is not None and values:
            raise CurateError(f"QTuningLoss: pass options= or {', '.join(values)}=, not both")
        self.options = options if options is not None else SelectionOptions.model_validate(values)
        check_options(self.options)
        if masking.needs_text(self.options) and tokenizer is None:
            raise CurateError(NEEDS_TEXT.format(what="tokenizer=..."))
        self.pieces = TokenPieces(tokenizer) if tokenizer is not None else None
        self.seed = seed
        self.calls = 0
        self.tally = Counter()
        self.last: BatchChoice | None = None

    def __call__(self, outputs, labels, num_items_in_batch=None, attention_mask=None, draw: int | None = None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        # one draw per micro-batch, reproducible from the seed and the micro-batch's place in training (`with_qtuning`
        # gives it, so a resumed run draws as an uninterrupted one), else the count of calls so far
        seed = self.seed * 1_000_003 + (self.calls if draw is None else draw)
        self.calls += 1
        choice = select_in_batch(
            logits, labels, self.options, attention_mask=attention_mask, pieces=self.pieces, seed=seed
        )
        self.last = choice
        self.tally["samples"] += sum(1 for p in choice.ppl if np.isfinite(p))
        self.tally["label_tokens"] += choice.label_tokens
        self.tally["loss_tokens"] += choice.loss_tokens
        for label in choice.selection:
            if label is not None:
                self.tally[f"kept_{label}"] += 1
        return choice.loss

    def take_tally(self) -> dict:
        """What was kept since the last call: samples seen, kept per selection (kept_Q2, kept_fill-Q4, ...), label
        and loss tokens."""
        tally, self.tally = dict(self.tally), Counter()
        return tally


def plain_loss(logits, labels, num_items_in_batch=None):
    """The cross-entropy of every labelled token, nothing selected: their mean, or their sum over
    `num_items_in_batch` (the labelled tokens of a whole accumulated batch, as transformers' own causal-LM loss)."""
    token_logp, _ = labelled_log_probs(logits, labels)
    if num_items_in_batch is not None:
        return -token_logp.sum() / num_items_in_batch
    return -token_logp.mean() if token_logp.numel() else logits.sum() * 0.0


PACKED = (
    "the in-trainer selection triages the samples of a micro-batch, one per row, but this batch packs several samples "
    "into a row (TRL's packing=True or padding_free=True): train with packing=False and padding_free=False"
)


def packed(inputs) -> bool:
    """Whether a batch packs several samples into one row: flash-attention's sequence boundaries, or position ids
    that start again inside a row's attended tokens."""
    if "cu_seq_lens_q" in inputs:
        return True
    positions = inputs.get("position_ids")
    if positions is None:
        return False
    starts = positions == 0
    if inputs.get("attention_mask") is not None:
        starts = starts & (inputs["attention_mask"] != 0)
    return bool((starts.sum(-1) > 1).any())


def with_qtuning(base: type) -> type:
    """`base` (transformers' Trainer, TRL's SFTTrainer, or a subclass) with the in-trainer loss: construct it with
    `qtuning=QTuningLoss(...)`. Training steps use the loss from the training forward's logits; evaluation uses the
    plain loss; each log carries the tally (samples kept per selection, label and loss tokens)."""

    class QTuningTrainer(base):
        def __init__(self, *args, qtuning: QTuningLoss, **kwargs):
            super().__init__(*args, **kwargs)
            self.qtuning = qtuning
            # a per-micro-batch mean, as the paper's code: the Trainer divides it by the accumulation steps (the
            # first flag in transformers 5, the second in 4.x, which skips the division for a model that takes loss
            # keyword arguments) and does not scale it by the number of processes
            self.loss_is_scaled_for_ga = False
            self.model_accepts_loss_kwargs = False
            self._step, self._micro = None, 0  # the optimizer step of the last micro-batch, and its place in it

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if packed(inputs):
                raise CurateError(PACKED)
            inputs = {**inputs, "use_cache": False}  # no key-value cache in a training forward
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            if model.training:
                loss = self.qtuning(
                    outputs, labels, attention_mask=inputs.get("attention_mask"), draw=self.micro_batch_index()
                )
            else:
                loss = plain_loss(outputs.logits, labels)
            return (loss, outputs) if return_outputs else loss

        def micro_batch_index(self) -> int:
            """This micro-batch's place in training, from the trainer's step (restored on resume) and the micro-batches
            already seen in it."""
            step = self.state.global_step
            self._micro = self._micro + 1 if self._step == step else 0
            self._step = step
            return step * self.args.gradient_accumulation_steps + self._micro

        def log(self, logs: dict, *args, **kwargs) -> None:
            if "loss" in logs:
                logs.update(self.qtuning.take_tally())
            super().log(logs, *args, **kwargs)

    QTuningTrainer.__name__ = QTuningTrainer.__qualname__ = f"QTuning{base.__name__}"
    return QTuningTrainer
