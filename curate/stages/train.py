"""`curate train DATA --model M --out DIR`: a small SFT trainer on transformers, honouring labels = -100.

It exists so the refresh loop and quick experiments work without another framework. The data path is the
one the tests prove: `datasets` Parquet -> input_ids/attention_mask/labels -> DataCollatorForSeq2Seq ->
transformers Trainer. With LoRA (peft) the adapter is merged before saving, so OUT is a plain model folder
that `curate score` (and any other tool) loads as is. OUT/_manifest.json is written last.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__, io
from ..errors import CurateError

@dataclass
class TrainConfig:
    data: str  # a pruned folder (data/*.parquet), a folder of Parquet files, or one Parquet file
    out: str
    model: str | None = None
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    lora_rank: int = 8  # 0 = full fine-tuning
    lora_alpha: int = 16
    warmup: float = 0.03  # fraction of the steps (< 1) or a number of steps
    scheduler: str = "cosine"
    seed: int = 0
    device: str = "auto"


def _validate(cfg: TrainConfig) -> None:
    problems = []
    if cfg.epochs <= 0:
        problems.append("--epochs must be positive")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        problems.append("--max-steps must be at least 1")
    if cfg.lr <= 0:
        problems.append("--lr must be positive")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        problems.append("--batch-size and --grad-accum must be at least 1")
    if cfg.lora_rank < 0:
        problems.append("--lora-rank must be 0 (full fine-tuning) or positive")
    if problems:
        raise CurateError("; ".join(problems))


def load_training_table(files: list[Path]):
    """input_ids / attention_mask / labels of the pruned Parquet as a `datasets.Dataset`, checked."""
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    try:
        ds = load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except Exception as e:  # datasets raises many types; the user needs the file, not the stack
        raise CurateError(f"{files[0].parent}: cannot read the Parquet files: {e}") from None
    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise CurateError(f"{files[0]}: column(s) {sorted(missing)} missing; train on the output of `curate prune` "
                          "(or `curate export --format trl`)")
    if "attention_mask" not in ds.column_names:
        ds = ds.map(lambda r: {"attention_mask": [1] * len(r["input_ids"])})
    return ds.select_columns(["input_ids", "attention_mask", "labels"])


def _loss_history_callback(history: list, log):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history.append({"step": state.global_step, "loss": round(float(logs["loss"]), 5)})
                log(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}")

    return LossLog()


def build_trainer(cfg: TrainConfig, model, tokenizer, dataset, work_dir: Path, callbacks=()):
    """The transformers Trainer used by `curate train` (and by the tests that prove the masks hold)."""
    import torch
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    args = TrainingArguments(
        output_dir=str(work_dir), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup, seed=cfg.seed, use_cpu=on_cpu,
        bf16=not on_cpu and torch.cuda.is_bf16_supported(), logging_steps=1, save_strategy="epoch",
        save_total_limit=1, report_to="none", disable_tqdm=True, remove_unused_columns=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # raw log dicts on stdout; progress goes through `log` instead
    return trainer


def run(cfg: TrainConfig, log=lambda msg: None, force: bool = False) -> dict:
    """Fine-tune `cfg.model` on `cfg.data` into `cfg.out`; returns the manifest. A finished identical run is a no-op."""
    from ..models import load_tokenizer, resolve_model

    _validate(cfg)
    started = time.time()
    out = Path(cfg.out)
    files = io.pruned_data_files(Path(cfg.data))
    model_ref = resolve_model(cfg.model)
    data_fingerprint = io.fingerprint_path(Path(cfg.data))
    identity = {k: v for k, v in asdict(cfg).items() if k not in ("data", "out", "model", "device")}
    fingerprint = io.fingerprint_config({"config": identity, "data": data_fingerprint, "model": model_ref.hash,
                                         "version": __version__})
    if not force and (done := io.is_done(out, fingerprint)):
        log(f"{out}: already trained on this data with these settings; nothing to do (--force redoes it)")
        return done
    (out / io.MANIFEST).unlink(missing_ok=True)

    import pyarrow.compute as pc
    import torch
    from transformers import AutoModelForCausalLM, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    set_seed(cfg.seed)  # the LoRA initialisation happens before the Trainer seeds anything
    tokenizer = load_tokenizer(model_ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = load_training_table(files)
    model = AutoModelForCausalLM.from_pretrained(model_ref.path, dtype=torch.float32)
    vocab = model.get_input_embeddings().num_embeddings
    columns = dataset.with_format("arrow")[:]  # Arrow columns: counts without Python lists per token
    top = pc.max(pc.list_flatten(columns["input_ids"])).as_py()
    n_loss = pc.sum(pc.not_equal(pc.list_flatten(columns["labels"]), -100)).as_py()
    if top >= vocab:
        raise CurateError(f"{files[0].parent}: token id {top} is outside the vocabulary of {model_ref.name!r} "
                          f"({vocab}); the data was tokenised for another model: score and prune with --model "
                          f"{model_ref.name}")
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        # Every linear layer but the output head: the attention and MLP projections of any decoder.
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    log(f"training {model_ref.name} on {len(dataset):,} samples ({n_loss:,} loss tokens), "
        f"{'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tuning'}")

    work = out / "checkpoints"  # Trainer checkpoints, so an interrupted run resumes; removed when done
    stamp = work / "fingerprint"
    if work.is_dir() and (not stamp.exists() or stamp.read_text() != fingerprint):
        shutil.rmtree(work)  # checkpoints of other data or settings must not be resumed
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    history: list = []
    trainer = build_trainer(cfg, model, tokenizer, dataset, work, [_loss_history_callback(history, log)])
    last = get_last_checkpoint(str(work))
    if last:
        log(f"resuming from {last}")
    result = trainer.train(resume_from_checkpoint=last)
    model = trainer.model
    if cfg.lora_rank:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(work, ignore_errors=True)
    return io.write_manifest(
        out, "train", fingerprint, started,
        inputs=[{"path": str(cfg.data), "fingerprint": data_fingerprint},
                {"model": model_ref.name, "path": model_ref.path, "hash": model_ref.hash}],
        config={**asdict(cfg), "model": model_ref.name},
        counts={"samples": len(dataset), "loss_tokens": n_loss, "steps": result.global_step},
        train_loss=round(float(result.training_loss), 5), loss_history=history,
    )
