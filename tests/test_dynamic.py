"""Q-Tuning inside the trainer: the plain function against an independent computation of the same micro-batch (plain
torch.log_softmax, the brute-force triage and token masks of tests/test_pruning.py), then real steps through the
transformers Trainer and TRL's SFTTrainer."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curate.config import SelectionOptions
from curate.dynamic import QTuningLoss, TokenPieces, packed, select_in_batch, with_qtuning
from curate.errors import CurateError
from curate.pruning import budget

from .test_pruning import bf_token_mask, bf_triage

PAPER_TOKENS = dict(token_unit="token", protect=[], placement="conversation")


def reference(logits, labels, attention, positions="response"):
    """Per sample, from a plain float64 log_softmax: log-probs of the labelled tokens, ppl and mean entropy."""
    logp = torch.log_softmax(logits.double(), -1)
    ent = -(logp.exp() * logp).sum(-1)
    out = []
    for b in range(len(labels)):
        lp, ents, attended_ent = {}, [], []
        for i in range(1, labels.shape[1]):
            if attention[b, i] and attention[b, i - 1]:
                attended_ent.append(float(ent[b, i - 1]))
            if labels[b, i] != -100:
                lp[i] = float(logp[b, i - 1, labels[b, i]])
                ents.append(float(ent[b, i - 1]))
        if lp:
            ppl = math.exp(-sum(lp.values()) / len(lp))
            mean_ent = float(np.mean(attended_ent if positions == "all" else ents))
        else:
            ppl = mean_ent = math.nan
        out.append((lp, ppl, mean_ent))
    return out


@st.composite
def micro_batches(draw):
    """Logits and labels of a right-padded micro-batch: each row a prompt (-100), one or two labelled turns, padding."""
    b = draw(st.integers(1, 9))
    t = draw(st.integers(4, 24))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, 40, generator=g) * draw(st.sampled_from([0.5, 3.0]))
    ids = torch.randint(0, 40, (b, t), generator=g)
    labels = torch.full((b, t), -100)
    attention = torch.zeros(b, t, dtype=torch.long)
    for row in range(b):
        length = draw(st.integers(2, t))
        prompt = draw(st.integers(1, length - 1))
        attention[row, :length] = 1
        labels[row, prompt:length] = ids[row, prompt:length]
        if draw(st.booleans()) and length - prompt > 3:  # a user turn inside: two assistant turns
            gap = draw(st.integers(prompt + 1, length - 2))
            labels[row, gap] = -100
        if draw(st.integers(0, 9)) == 0:
            labels[row] = -100  # a sample with no loss token
    return logits, labels, attention


@settings(max_examples=120, deadline=None)
@given(
    batch=micro_batches(),
    ratio=st.sampled_from([0.125, 0.25, 0.5, 1.0]),
    token_ratio=st.sampled_from([0.25, 0.5]),
    order=st.sampled_from(["drop-high", "drop-low"]),
    budget=st.sampled_from(["sample", "turn"]),
    lam=st.sampled_from([0.0, 0.5]),
    positions=st.sampled_from(["response", "all"]),
    fill=st.sampled_from(["rank", "minmax"]),
)
def test_selection_masks_and_loss_equal_an_independent_triage_of_the_micro_batch(
    batch, ratio, token_ratio, order, budget, lam, positions, fill
):
    logits, labels, attention = batch
    logits.requires_grad_(True)
    options = SelectionOptions(
        ratio=ratio,
        token_ratio=token_ratio,
        token_order=order,
        token_budget=budget,
        lam=lam,
        entropy_positions=positions,
        fill=fill,
        **PAPER_TOKENS,
    )
    choice = select_in_batch(logits, labels, options, attention_mask=attention)
    ref = reference(logits.detach(), labels, attention, positions)

    # coordinates: the function's (float32) against the plain float64 computation
    for (_, ppl, ent), got_ppl, got_ent in zip(ref, choice.ppl, choice.ent):
        assert (math.isnan(ppl) and math.isnan(got_ppl)) or got_ppl == pytest.approx(ppl, rel=1e-4)
        assert (math.isnan(ent) and math.isnan(got_ent)) or got_ent == pytest.approx(ent, rel=1e-4, abs=1e-5)

    # the triage: exactly the spec's, run on the samples with a loss token
    eligible = [b for b, (lp, _, _) in enumerate(ref) if lp]
    ids = [f"{b:05d}" for b in eligible]
    want = bf_triage(ids, [choice.ppl[b] for b in eligible], [choice.ent[b] for b in eligible], ratio, fill)
    got = {f"{b:05d}": s for b, s in enumerate(choice.selection) if s is not None}
    assert got == want
    assert len(got) == (max(1, math.floor(ratio * len(eligible) + 0.5)) if eligible else 0)

    # the masks: Q2 samples by the spec's token rule on their own log-probs, the others whole, nothing unlabelled
    for b, (lp, _, _) in enumerate(ref):
        trainable = (labels[b] != -100).numpy().astype(np.int8)
        trainable[0] = 0
        mask = choice.token_mask[b]
        label = choice.selection[b]
        if label is None:
            assert not mask.any()
        elif label in ("Q2", "fill-Q2"):
            length = int(attention[b].sum())
            logprob = np.zeros(length)
            for i, v in lp.items():
                logprob[i] = v
            want_mask = bf_token_mask(logprob, trainable[:length], token_ratio, lam, order, budget)
            assert mask[:length].tolist() == want_mask and not mask[length:].any()
        else:
            assert mask.tolist() == trainable.tolist()

    # the loss: the mean cross-entropy of the kept tokens, and its gradient
    kept = [(b, i) for b in range(len(labels)) for i in range(1, labels.shape[1]) if choice.token_mask[b, i]]
    assert choice.loss_tokens == len(kept)
    if kept:
        logp = torch.log_softmax(logits.double(), -1)
        expected = -sum(logp[b, i - 1, labels[b, i]] for b, i in kept) / len(kept)
        assert choice.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        (grad,) = torch.autograd.grad(choice.loss, logits)
        (want_grad,) = torch.autograd.grad(expected, logits)
        torch.testing.assert_close(grad, want_grad.float(), rtol=1e-4, atol=1e-6)
        assert not grad[:, :-1][torch.tensor(choice.token_mask[:, 1:] == 0)].any()  # pruned positions get no gradient


def test_the_random_baseline_draws_samples_and_tokens_per_micro_batch():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 30, 40, generator=g), torch.randint(0, 40, (8, 30), generator=g)
    labels[:, :5] = -100
    options = SelectionOptions(ratio=0.25, token_ratio=0.5, strategy="random", token_strategy="random", **PAPER_TOKENS)
    draws = [select_in_batch(logits, labels, options, seed=s) for s in range(6)]
    for choice in draws:
        assert sum(s is not None for s in choice.selection) == 2
        assert all(s in (None, "random") for s in choice.selection)
        for b, s in enumerate(choice.selection):  # random tokens: half of each kept sample's 25, the end kept
            assert choice.token_mask[b].sum() == (13 if s else 0)
            assert not s or choice.token_mask[b, -1] == 1
    assert len({tuple(c.selection) for c in draws}) > 1  # a new draw each seed
    assert len({c.token_mask.tobytes() for c in draws}) > 1


def test_options_are_prunes_and_strategies_without_batch_columns_are_refused():
    assert QTuningLoss(token_unit="token", protect=[]).options == SelectionOptions(token_unit="token", protect=[])
    paper = QTuningLoss(preset="paper").options
    assert (paper.token_unit, paper.lam, paper.fill, paper.token_order) == ("token", 0.5, "minmax", "drop-high")
    with pytest.raises(CurateError, match="ifd"):
        QTuningLoss(strategy="ifd", token_unit="token", protect=[])
    with pytest.raises(CurateError, match="tokenizer"):
        QTuningLoss()  # whole words and protected spans read the tokens' text
    with pytest.raises(CurateError, match="not both"):  # not: ratio silently ignored
        QTuningLoss(options=SelectionOptions(token_unit="token", protect=[]), ratio=0.25)
    labels = torch.tensor([[-100, 3, 4, 5]] * 4)
    with pytest.raises(CurateError, match="pieces"):  # not: Q2 samples silently keep every token
        select_in_batch(torch.randn(4, 4, 8), labels, SelectionOptions(ratio=0.5))


def test_a_sentencepiece_tokenizers_words_keep_their_spaces():
    """SentencePiece tokenizers (Llama, Mistral, Gemma) drop a token's leading space when it is decoded alone; the
    trainer's view of a reply must still have its words apart, or a whole-word unit would span the whole reply."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\u2581The": 1, "\u2581answer": 2, "\u2581is": 3, "\u258142.": 4}
    sp = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    ids = torch.tensor(tok("The answer is 42.")["input_ids"])
    assert tok.decode([2]) == "answer"  # the tokenizer's own single-token decoding loses the space
    text = "".join(TokenPieces(tok)(ids))
    assert text.split() == ["The", "answer", "is", "42."]


def test_whole_words_and_the_final_answer_stay_whole_in_the_trainer(smollm2_dir):
    """The default rule inside the trainer, on GSM8K answers tokenised by the built-in model's tokenizer: a pruned
    sample never loses part of a word or number, and `#### N` is always in the loss."""
    import json

    from transformers import AutoTokenizer

    from .conftest import SHARED

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    rows = [json.loads(line) for line in open(SHARED / "gsm8k" / "train.jsonl")][:8]
    encoded, labels = [], []
    for r in rows:
        prompt = tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True)
        answer = tok(r["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        encoded.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    t = max(map(len, encoded))
    ids = torch.tensor([e + [0] * (t - len(e)) for e in encoded])
    lab = torch.tensor([x + [-100] * (t - len(x)) for x in labels])
    attention = (torch.arange(t)[None] < torch.tensor([len(e) for e in encoded])[:, None]).long()
    logits = torch.randn(len(rows), t, len(tok), generator=torch.Generator().manual_seed(1))
    loss = QTuningLoss(tokenizer=tok, ratio=1.0, token_ratio=0.5)
    choice = select_in_batch(logits, lab, loss.options, attention_mask=attention, pieces=loss.pieces)
    pruned = 0
    for b, label in enumerate(choice.selection):
        if label not in ("Q2", "fill-Q2"):
            continue
        pruned += 1
        length = int(attention[b].sum())
        text, starts, ends = "", [], []
        for i in range(length):
            piece = tok.decode([int(ids[b, i])]) if lab[b, i] != -100 else ""
            starts.append(len(text))
            text += piece
            ends.append(len(text))
        mask = choice.token_mask[b]
        final = text.index("####")
        for i in range(length):
            if lab[b, i] != -100 and ends[i] > final:
                assert mask[i] == 1, f"sample {b}: {text[starts[i] : ends[i]]!r} of the final answer left the loss"
        for i in range(1, length):  # a token that continues a word (no space or mark between) shares its fate
            inside = lab[b, i] != -100 and lab[b, i - 1] != -100 and starts[i] == ends[i - 1] > 0
            if inside and text[ends[i - 1] - 1].isalnum() and text[starts[i] : ends[i]][:1].isalnum():
                assert mask[i] == mask[i - 1], f"sample {b}: a word split at {text[starts[i - 1] : ends[i]]!r}"
    assert pruned > 0


# ---------------------------------------------------------------- real steps through the trainers


@pytest.fixture(scope="module")
def tiny_dataset(tiny_run):
    from curate.stages.train import load_training_table

    from .conftest import data_files

    return load_training_table(data_files(tiny_run / "pruned"))[0]


TRAIN_ARGS = dict(
    max_steps=3,
    per_device_train_batch_size=8,
    learning_rate=3e-3,
    use_cpu=True,
    report_to="none",
    logging_steps=1,
    save_strategy="no",
    disable_tqdm=True,
)


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _changed(before, model) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))


def test_real_steps_through_the_transformers_trainer_with_compute_loss_func(tiny_model_dir, tiny_dataset, tmp_path):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tok = _tiny(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = QTuningLoss(tokenizer=tok, ratio=0.25, token_ratio=0.5)
    seen = []

    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        value = loss(outputs, labels, num_items_in_batch)
        seen.append((outputs.logits.detach().clone(), labels.clone(), loss.last))
        return value

    args = TrainingArguments(**TRAIN_ARGS, output_dir=str(tmp_path), remove_unused_columns=False)
    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    trainer = Trainer(
        model=model, args=args, train_dataset=tiny_dataset, data_collator=collator, compute_loss_func=compute_loss_func
    )
    trainer.loss_is_scaled_for_ga = False
    trainer.train()
    assert len(seen) == 3 and _changed(before, trainer.model)
    for logits, labels, choice in seen:  # the loss the trainer stepped on is the function's on that micro-batch
        again = select_in_batch(logits, labels, loss.options, pieces=loss.pieces)
        assert again.selection == choice.selection and (again.token_mask == choice.token_mask).all()
        assert sum(s is not None for s in choice.selection) == budget(0.25, len(labels))


@pytest.mark.parametrize("kind", ["transformers", "trl"])
def test_with_qtuning_trains_and_logs_what_it_kept(tiny_model_dir, tiny_dataset, tmp_path, kind):
    model, tok = _tiny(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qtuning = QTuningLoss(tokenizer=tok, ratio=0.25, token_ratio=0.5)
    if kind == "trl":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**TRAIN_ARGS, output_dir=str(tmp_path), bf16=False)
        trainer = with_qtuning(SFTTrainer)(
            model=model, args=args, train_dataset=tiny_dataset, processing_class=tok, qtuning=qtuning
        )
    else:
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        args = TrainingArguments(**TRAIN_ARGS, output_dir=str(tmp_path), remove_unused_columns=False)
        collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
        trainer = with_qtuning(Trainer)(
            model=model, args=args, train_dataset=tiny_dataset, data_collator=collator, qtuning=qtuning
        )
    trainer.train()
    assert _changed(before, trainer.model)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        kept = sum(v for k, v in entry.items() if k.startswith("kept_"))
        assert kept == budget(0.25, entry["samples"]) and 0 < entry["loss_tokens"] < entry["label_tokens"]
    assert [entry["samples"] for entry in logs] == [8, 8, 4]  # 20 rows


def test_with_gradient_accumulation_each_micro_batchs_mean_counts_once(tiny_model_dir, tiny_dataset, tmp_path):
    """The Trainer divides the per-micro-batch mean by the accumulation steps: a logged step's loss is the mean of
    its micro-batches' losses (a loss left unscaled would log, and step, twice as large)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    class Recorded(QTuningLoss):
        def __call__(self, *args, **kwargs):
            loss = super().__call__(*args, **kwargs)
            self.seen.append(loss.item())
            return loss

    model, tok = _tiny(tiny_model_dir)
    qtuning = Recorded(tokenizer=tok, ratio=0.5, token_ratio=0.5)
    qtuning.seen = []
    settings_ = {**TRAIN_ARGS, "max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    args = TrainingArguments(**settings_, output_dir=str(tmp_path), remove_unused_columns=False)
    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    trainer = with_qtuning(Trainer)(
        model=model, args=args, train_dataset=tiny_dataset, data_collator=collator, qtuning=qtuning
    )
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(qtuning.seen) == 4
    assert logged == pytest.approx([np.mean(qtuning.seen[:2]), np.mean(qtuning.seen[2:])], rel=1e-3, abs=1e-4)


def test_rows_padded_after_their_sample_are_not_packed_ones():
    padded = {"position_ids": torch.tensor([[0, 1, 2, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    assert not packed(padded) and not packed({"input_ids": torch.zeros(2, 3)})
    assert packed({"position_ids": torch.tensor([[0, 1, 2, 0, 1]])})  # TRL's padding-free row: no attention mask


@pytest.mark.parametrize("mode", [{"packing": True}, {"padding_free": True, "max_length": None}])
def test_trls_packed_rows_are_refused_not_triaged_as_one_sample(tiny_model_dir, tiny_dataset, tmp_path, mode):
    """Packed, a micro-batch is one row: its triage would keep every sample (max(1, round(0.25 x 1)) = 1 of 1)."""
    from trl import SFTConfig, SFTTrainer

    model, tok = _tiny(tiny_model_dir)
    args = SFTConfig(**TRAIN_ARGS, output_dir=str(tmp_path), bf16=False, **mode)
    qtuning = QTuningLoss(tokenizer=tok, ratio=0.25, token_ratio=0.5)
    trainer = with_qtuning(SFTTrainer)(
        model=model, args=args, train_dataset=tiny_dataset, processing_class=tok, qtuning=qtuning
    )
    with pytest.raises(CurateError, match="packing=False and padding_free=False"):
        trainer.train()
    assert qtuning.calls == 0


def test_a_resumed_run_draws_as_an_uninterrupted_one(tiny_model_dir, tiny_dataset, tmp_path):
    """The random baseline's draw of each micro-batch follows its place in training, so a run resumed from a checkpoint
    (through `curate train`'s own trainer) selects what the uninterrupted run selected (a count of calls would start
    again at 0)."""
    from transformers import TrainerCallback

    from curate.config.train import TrainConfig
    from curate.stages.train import build_trainer

    class Recorded(QTuningLoss):
        def __call__(self, *args, **kwargs):
            loss = super().__call__(*args, **kwargs)
            self.seen.append((tuple(self.last.selection), self.last.token_mask.tobytes()))
            return loss

    class StopAfterTheFirstStep(TrainerCallback):  # an interruption: a checkpoint at step 1, then no more steps
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = control.should_training_stop = True

    cfg = TrainConfig(
        data="", out="", epochs=1, batch_size=4, grad_accum=2, lr=3e-3, lora_rank=0, device="cpu", dtype="float32"
    )

    def train(out, resume=None, callbacks=()):
        model, tok = _tiny(tiny_model_dir)
        qtuning = Recorded(ratio=0.25, token_ratio=0.5, strategy="random", token_strategy="random", **PAPER_TOKENS)
        qtuning.seen = []
        build_trainer(cfg, model, tok, tiny_dataset, out, callbacks, qtuning).train(resume_from_checkpoint=resume)
        return qtuning.seen

    whole = train(tmp_path / "whole")  # 20 rows, micro-batches of 4, 2 a step: steps of 2, 2 and 1 micro-batches
    interrupted = train(tmp_path / "cut", callbacks=[StopAfterTheFirstStep()])
    resumed = train(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-1"))
    assert len(whole) == 5 and interrupted == whole[:2]
    assert resumed == whole[2:]
    assert len(set(whole)) > 1  # a new draw every micro-batch


def test_the_log_says_when_a_small_batch_keeps_more_than_the_ratio():
    from curate.config.train import TrainConfig
    from curate.stages.train import selection_in_words

    def words(batch_size):
        return selection_in_words(TrainConfig(data="d", out="o", dynamic=True, batch_size=batch_size))

    assert "keeps 1 of 8 samples, qtuning token pruning" in words(8)  # ratio 0.125
    assert "keeps 1 of 2 samples (50%, not --ratio 0.125" in words(2)
