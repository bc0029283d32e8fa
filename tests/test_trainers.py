"""The pruned Parquet trains as is in TRL's SFTTrainer and in the transformers Trainer, with its masks honoured.

The reference is computed here, independently of both trainers: per-token cross-entropy from a plain forward
and torch.log_softmax, averaged over the positions the `loss_mask` column keeps (targets taken from input_ids,
not from the labels column under test).
"""

import copy

import pytest
import torch
from datasets import load_dataset

from curate.config import TrainConfig
from curate.stages.train import build_trainer, load_training_table

from .conftest import cpu_sft_args, data_files


def masked_ce(model, rows, mask_column="loss_mask"):
    total, count = 0.0, 0
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        target = torch.tensor(r["input_ids"][1:])
        keep = torch.tensor(r[mask_column][1:], dtype=torch.bool)
        total = total - logp.gather(-1, target[:, None])[:, 0][keep].sum()
        count += int(keep.sum())
    return total / count


@pytest.fixture(scope="module")
def pruned_rows(tiny_run):
    """The pruned rows as `datasets` loads them, each with `full_mask`: its trainable mask before token pruning."""
    import pyarrow.parquet as pq

    trainable = {
        r["id"]: r["trainable"]
        for r in pq.read_table(
            sorted((tiny_run / "scores").glob("part-*.parquet")), columns=["id", "trainable"]
        ).to_pylist()
    }
    rows = load_dataset("parquet", data_files=[str(f) for f in data_files(tiny_run / "pruned")], split="train")
    rows = [{**r, "full_mask": trainable[r["id"]]} for r in rows.to_list()]
    # Without pruned tokens these tests could not tell a masked loss from a full one.
    assert any(sum(r["loss_mask"]) < sum(r["full_mask"]) for r in rows)
    return rows


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


class LossLog:
    def __init__(self):
        from transformers import TrainerCallback

        losses = self.losses = []

        class CB(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses.append(logs["loss"])

        self.callback = CB()


def _assert_trains_on_masked_loss(trainer, model_before, rows, losses):
    """First step's loss (whole dataset in one batch, weights untouched) == the independent masked CE."""
    with torch.no_grad():
        expected = masked_ce(model_before, rows).item()
    trainer.train()
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        full = masked_ce(model_before, [{**r, "loss_mask": r["full_mask"]} for r in rows]).item()
    assert abs(full - expected) > 1e-3 * expected  # the pruned tokens would have changed the loss
    changed = any(not torch.equal(a, b) for a, b in zip(model_before.parameters(), trainer.model.parameters()))
    assert changed and losses[-1] < losses[0]  # real optimizer steps happened


def test_transformers_trainer_honours_the_loss_mask(tiny_run, tiny_model_dir, pruned_rows):
    from transformers import AutoTokenizer

    model = _model(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset, _ = load_training_table(data_files(tiny_run / "pruned"))
    before = copy.deepcopy(model)
    log = LossLog()
    cfg = TrainConfig(
        data="",
        out="",
        max_steps=4,
        lr=3e-3,
        batch_size=len(dataset),
        lora_rank=0,
        warmup=0,
        scheduler="constant",
        device="cpu",
    )
    trainer = build_trainer(cfg, model, tokenizer, dataset, tiny_run / "hf-work", [log.callback])
    _assert_trains_on_masked_loss(trainer, before, pruned_rows, log.losses)


def test_trainer_gradients_equal_the_masked_reference(tiny_run, tiny_model_dir, pruned_rows):
    """Gradients, not only the loss value: the trainer's loss on a collated batch backpropagates exactly like
    the hand-written masked cross-entropy, so pruned positions receive no gradient signal."""
    from transformers import AutoTokenizer

    model = _model(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset, _ = load_training_table(data_files(tiny_run / "pruned"))
    cfg = TrainConfig(data="", out="", max_steps=1, batch_size=len(dataset), lora_rank=0, device="cpu")
    trainer = build_trainer(cfg, model, tokenizer, dataset, tiny_run / "grad-work")
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(model, batch).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    masked_ce(model, pruned_rows).backward()
    for g, ref in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, ref.to(g.dtype), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packing", [False, True], ids=["no-packing", "packing"])
def test_trl_sft_trainer_honours_the_loss_mask(tiny_run, tiny_model_dir, pruned_rows, packing):
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    model = _model(tiny_model_dir)
    before = copy.deepcopy(model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # The pruned folder as it is written, loaded the way the README shows.
    dataset = load_dataset("parquet", data_files=[str(f) for f in data_files(tiny_run / "pruned")], split="train")
    args = cpu_sft_args(  # fp32: exact comparison
        tiny_run / f"trl-{packing}",
        max_steps=4,
        learning_rate=3e-3,
        per_device_train_batch_size=len(dataset),
        packing=packing,
        lr_scheduler_type="constant",
        logging_steps=1,
        seed=0,
    )
    log = LossLog()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[log.callback]
    )
    _assert_trains_on_masked_loss(trainer, before, pruned_rows, log.losses)


def test_the_exported_trl_script_trains_on_a_cpu_as_written(tiny_run, tmp_path):
    """`curate export --format trl` writes train_trl.py; run as it is, on this CPU, it trains and saves."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from curate.cli import app

    out = tmp_path / "export"
    res = CliRunner().invoke(app, ["export", str(tiny_run / "pruned"), "--format", "trl", "--out", str(out)])
    assert res.exit_code == 0, res.output
    run = subprocess.run(
        [sys.executable, str(out / "train_trl.py")], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert any((tmp_path / "q-curate-sft").glob("checkpoint-*/model.safetensors"))
    logged = [line for line in (run.stdout + run.stderr).splitlines() if "'loss'" in line]
    assert logged and "'epoch'" in logged[0]  # a loss line from the first step (one row a step on a CPU)
