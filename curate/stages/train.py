"""`curate train DATA --model M --out DIR`: a small SFT trainer on transformers, honouring labels = -100.

It exists so the refresh loop and quick experiments work without another framework. The data path is the
one the tests prove: `datasets` Parquet -> input_ids/attention_mask/labels -> DataCollatorForSeq2Seq ->
transformers Trainer. With LoRA (peft) the adapter is merged before saving, so OUT is a plain model folder
that `curate score` (and any other tool) loads as is. OUT/_manifest.json is written last.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .. import io, pruning, schema
from ..config.selection import SelectionOptions
from ..config.train import TrainConfig
from ..errors import CurateError
from ..executor import Job, identify_model, runner
from ..kinds import Model
from ..registry import register
from ..stage import Cli, Input, Stage

CHECKPOINTS = "checkpoints"


def training_files(data: Path, manifest: dict | None) -> list[Path]:
    """The Parquet files to train on: those of a pruned folder or of a scores folder (with --dynamic: every scored
    sample enters the per-batch triage), its manifest verified by the executor, or one Parquet file given explicitly."""
    if manifest is None:
        if data.suffix != ".parquet":
            raise CurateError(f"{data}: expected a .parquet file, a `curate prune` folder or a `curate score` folder")
        return [data]
    if io.manifest_kind(manifest) == "scores":
        files = [data / f["name"] for f in manifest["files"]]
    else:
        files = io.pruned_data_files(data, manifest)
    if not files:
        raise CurateError(f"{data}: the dataset is empty")
    return files


def load_training_table(files: list[Path]):
    """(input_ids / attention_mask / labels of the training Parquet as a `datasets.Dataset`, the ids of the samples
    left out), checked: labels from the scores' trainable mask where the files are scores; samples without a loss
    token left out (they would teach nothing and, all in one batch, log a loss of 0); data with no loss token at all
    refused."""
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    try:
        ds = load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except Exception as e:  # datasets raises many types; the user needs the file, not the stack
        raise CurateError(f"{files[0].parent}: cannot read the Parquet files: {e}") from None
    if "labels" not in ds.column_names and "trainable" in ds.column_names:  # scores: every assistant token
        ds = ds.map(
            lambda r: {"labels": [i if t else schema.IGNORE_INDEX for i, t in zip(r["input_ids"], r["trainable"])]}
        )
    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise CurateError(
            f"{files[0]}: column(s) {sorted(missing)} missing; train on the output of `curate prune` or `curate score` "
            "(or `curate export --format trl`)"
        )
    if "attention_mask" not in ds.column_names:
        ds = ds.map(lambda r: {"attention_mask": [1] * len(r["input_ids"])})
    if "id" not in ds.column_names:
        ds = ds.add_column("id", [f"row {i}" for i in range(len(ds))])
    ds = ds.select_columns(["id", "input_ids", "attention_mask", "labels"])
    counts = loss_tokens_per_row(ds.with_format("arrow")[:]["labels"])
    empty = np.flatnonzero(counts == 0).tolist()
    if len(empty) == len(ds):
        raise CurateError(
            f"{files[0].parent}: no sample has a loss token (every label is -100), so training would learn nothing; "
            "check the masks, e.g. with `curate inspect`"
        )
    left_out = ds.select(empty)["id"] if empty else []
    if empty:
        ds = ds.select(np.flatnonzero(counts).tolist())
    return ds.remove_columns("id"), left_out


def loss_tokens_per_row(labels) -> np.ndarray:
    """Labels other than -100 in each row of an Arrow list column, without a Python object per token."""
    import pyarrow.compute as pc

    labels = labels.combine_chunks()
    row = np.repeat(np.arange(len(labels)), pc.list_value_length(labels).fill_null(0).to_numpy())
    flat = pc.list_flatten(labels).to_numpy()
    return np.bincount(row[flat != schema.IGNORE_INDEX], minlength=len(labels))


def _loss_history_callback(history: list, log):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not logs.get("loss_tokens"):
                return  # a step that trained no token has no loss to show
            entry = {"step": state.global_step, "loss": round(float(logs["loss"]), 5)}
            entry.update({k: v for k, v in logs.items() if k in TALLY or k.startswith("kept_")})
            history.append(entry)
            kept = ", ".join(f"{k[5:]} {v}" for k, v in sorted(entry.items()) if k.startswith("kept_"))
            log(
                f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f} on {entry['loss_tokens']:,} of "
                f"{entry['label_tokens']:,} label tokens" + (f"; kept {kept} of {entry['samples']}" if kept else "")
            )

    return LossLog()


TALLY = ("samples", "label_tokens", "loss_tokens")  # what every logged step counts (and, dynamic, kept_Q2, ...)


def train_dtype(cfg: TrainConfig) -> tuple[str, str]:
    """(dtype, why): `auto` is bfloat16 autocast where the device computes it natively (`curate score`'s rule)."""
    from ..backends import choose_dtype, cpu_bf16_feature, resolve_device

    device = resolve_device(cfg.device)
    if device.startswith("cuda") and cfg.dtype == "auto":
        import torch

        if not torch.cuda.is_bf16_supported():
            return "float32", "auto: this GPU has no bfloat16"
    return choose_dtype(cfg.dtype, device, None if device.startswith("cuda") else cpu_bf16_feature())


def trainer_class(qtuning):
    """transformers' Trainer that counts what each step trains on (samples, label and loss tokens) into its logs;
    with `qtuning` (a dynamic.QTuningLoss) it selects in each micro-batch as well."""
    from transformers import Trainer

    from ..dynamic import plain_loss, with_qtuning

    if qtuning is not None:
        return with_qtuning(Trainer)

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            # the model's own loss, less its float32 log-softmax over the prompt's and the padding's positions
            loss = plain_loss(outputs.logits, labels, num_items_in_batch)
            if model.training:
                tally = self.__dict__.setdefault("tally", dict.fromkeys(TALLY, 0))
                tokens = int((labels[:, 1:] != schema.IGNORE_INDEX).sum())
                tally["samples"] += len(labels)
                tally["label_tokens"] += tokens
                tally["loss_tokens"] += tokens
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict, *args, **kwargs) -> None:
            if "loss" in logs:
                logs.update(self.__dict__.pop("tally", dict.fromkeys(TALLY, 0)))
            super().log(logs, *args, **kwargs)

    return CountingTrainer


def build_trainer(cfg: TrainConfig, model, tokenizer, dataset, work_dir: Path, callbacks=(), qtuning=None):
    """The transformers Trainer used by `curate train` (and by the tests that prove the masks hold); with `qtuning`,
    the in-trainer selection (`curate.dynamic`)."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, TrainingArguments

    from ..backends import resolve_device

    on_cpu = resolve_device(cfg.device) == "cpu"
    args = TrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup,
        seed=cfg.seed,
        use_cpu=on_cpu,
        bf16=train_dtype(cfg)[0] == "bfloat16",  # autocast: weights, gradients and optimizer stay float32
        include_num_input_tokens_seen="non_padding",  # the forward tokens, kept in checkpoints across a resume
        logging_steps=1,
        save_strategy="epoch",
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    trainer = trainer_class(qtuning)(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        **({"qtuning": qtuning} if qtuning is not None else {}),
    )
    trainer.remove_callback(PrinterCallback)  # raw log dicts on stdout; progress goes through `log` instead
    return trainer


def identify(job: Job) -> dict:
    cfg = job.cfg
    kind = io.manifest_kind(job.manifests["data"]) if job.manifests.get("data") else "pruned"
    if kind == "scores" and not cfg.dynamic:
        job.log("training on every scored sample, whole (full data); --dynamic selects in each micro-batch instead")
    if cfg.dynamic:
        from ..dynamic import check_options

        check_options(cfg.selection)
    else:
        default = SelectionOptions()
        given = [f for f in SelectionOptions.model_fields if getattr(cfg.selection, f) != getattr(default, f)]
        if given:  # they would change nothing but the run's fingerprint
            raise CurateError(
                f"{', '.join('--' + f.replace('_', '-') for f in given)}: selection options act inside the trainer "
                "only; add --dynamic, or select offline with `curate prune` and train on its folder"
            )
    job.context["files"] = training_files(job.inputs["data"], job.manifests.get("data"))
    job.context["dtype"], why = train_dtype(cfg)
    job.log(f"compute dtype {job.context['dtype']} ({why})")
    return {**identify_model(job), "dtype": job.context["dtype"]}


def compute(job: Job) -> dict:
    return _train(job.cfg, job.context["files"], job.context["model"], job.out, job.log)


def _train(cfg: TrainConfig, files: list[Path], model_ref, out: Path, log) -> dict:
    import pyarrow.compute as pc
    import torch
    from transformers import AutoModelForCausalLM, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from ..models import load_tokenizer

    set_seed(cfg.seed)  # the LoRA initialisation happens before the Trainer seeds anything
    tokenizer = load_tokenizer(model_ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset, left_out = load_training_table(files)
    if left_out:
        names = ", ".join(repr(i) for i in left_out[:5]) + (" ..." if len(left_out) > 5 else "")
        log(f"{len(left_out):,} samples without a loss token left out (every label is -100): {names}")
    model = AutoModelForCausalLM.from_pretrained(model_ref.path, dtype=torch.float32)
    vocab = model.get_input_embeddings().num_embeddings
    columns = dataset.with_format("arrow")[:]  # Arrow columns: counts without Python lists per token
    top = pc.max(pc.list_flatten(columns["input_ids"])).as_py()
    n_loss = pc.sum(pc.not_equal(pc.list_flatten(columns["labels"]), -100)).as_py()
    if top >= vocab:
        raise CurateError(
            f"{files[0].parent}: token id {top} is outside the vocabulary of {model_ref.name!r} "
            f"({vocab}); the data was tokenised for another model: score and prune with --model "
            f"{model_ref.name}"
        )
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        # Every linear layer but the output head: the attention and MLP projections of any decoder.
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    qtuning = None
    if cfg.dynamic:
        from ..dynamic import QTuningLoss

        qtuning = QTuningLoss(tokenizer=tokenizer, seed=cfg.seed, options=cfg.selection)
    log(
        f"training {model_ref.name} on {len(dataset):,} samples ({n_loss:,} loss tokens), "
        f"{'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tuning'}"
        + (f"; in each batch of {cfg.batch_size}: {selection_in_words(cfg)}" if cfg.dynamic else "")
    )

    work = out / CHECKPOINTS  # Trainer checkpoints, so an interrupted run resumes; removed when done
    history: list = []
    callbacks = [_loss_history_callback(history, log)]
    trainer = build_trainer(cfg, model, tokenizer, dataset, work, callbacks, qtuning)
    last = get_last_checkpoint(str(work))
    if last:
        log(f"resuming from {last}")
    result = trainer.train(resume_from_checkpoint=last)
    model = trainer.model
    if cfg.lora_rank:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # every logged step, the steps of an interrupted attempt included (the checkpoint carries its log history)
    steps = [e for e in trainer.state.log_history if "loss" in e and "loss_tokens" in e]
    trained = {k: sum(int(e.get(k, 0)) for e in steps) for k in TALLY}
    kept = {k[5:]: sum(int(e.get(k, 0)) for e in steps) for k in sorted({k for e in steps for k in e}) if "kept_" in k}
    shutil.rmtree(work, ignore_errors=True)
    return {
        "base_model": model_ref.entry(),
        "config": {**cfg.model_dump(), "model": model_ref.name},
        "model": {"name": str(out), "path": str(out.resolve()), "base": model_ref.name},
        "dtype": train_dtype(cfg)[0],
        "counts": {
            "samples": len(dataset),
            "samples_without_loss_tokens": len(left_out),
            "loss_tokens": n_loss,
            "steps": result.global_step,
            # what the whole run computed on: every forward token and every token in the loss, over all steps
            "forward_tokens": int(trainer.state.num_input_tokens_seen),
            "trained_samples": trained["samples"],
            "trained_label_tokens": trained["label_tokens"],
            "trained_loss_tokens": trained["loss_tokens"],
        },
        "kept_by_selection": kept,
        "train_loss": round(float(result.training_loss), 5),
        "loss_history": history,
    }


def selection_in_words(cfg: TrainConfig) -> str:
    sel = cfg.selection
    what = "Q-Tuning's triage" if sel.strategy == "qtuning" else f"the {sel.strategy} strategy"
    tokens = "no token pruning" if sel.token_strategy == "none" else f"{sel.token_strategy} token pruning"
    kept = pruning.budget(sel.ratio, cfg.batch_size)
    share = f"{kept} of {cfg.batch_size} samples"
    if abs(kept / cfg.batch_size - sel.ratio) > 0.25 * sel.ratio:  # a small batch cannot keep the share asked for
        share += f" ({kept / cfg.batch_size:.0%}, not --ratio {sel.ratio:g}: raise --batch-size to keep nearer it)"
    return f"{what} keeps {share}, {tokens} at {sel.token_ratio:g}"


class TrainResult(Model):
    model: dict
    counts: dict[str, int]
    train_loss: float
    loss_history: list[dict]
    dtype: str = "float32"
    kept_by_selection: dict[str, int] = {}


def summary(m: TrainResult) -> list:
    c = m.counts
    last = m.loss_history[-1]["loss"] if m.loss_history else "n/a"
    lines = [
        f"trained {c['steps']:,} steps ({m.dtype}) on {c['samples']:,} samples ({c['loss_tokens']:,} loss tokens), "
        f"final loss {last}; model: {m.config['out']}"
    ]
    if c.get("samples_without_loss_tokens"):
        lines.append(f"{c['samples_without_loss_tokens']:,} samples without a loss token were left out")
    if "forward_tokens" in c:
        lines.append(
            f"over all steps: {c['forward_tokens']:,} tokens through the forward pass, {c['trained_loss_tokens']:,} "
            f"in the loss (of {c['trained_label_tokens']:,} with a label)"
        )
    if m.kept_by_selection:
        kept = ", ".join(f"{k} {v:,}" for k, v in m.kept_by_selection.items())
        lines.append(f"kept in the micro-batches, of {c['trained_samples']:,} samples seen: {kept}")
    return lines


STAGE = register(
    Stage(
        name="train",
        produces="model",
        config=TrainConfig,
        doc="Fine-tune a model with the built-in transformers trainer on pruned data (labels = -100 are not in the "
        "loss), or with --dynamic select in each micro-batch as the paper's code does.",
        compute=compute,
        identify=identify,
        inputs=(
            Input(
                "data",
                kind=("pruned", "scores"),
                file_ok=True,
                hint="no Parquet files to train on: give a `curate prune` folder, a `curate score` folder (with "
                "--dynamic) or one .parquet file with input_ids and labels",
            ),
            Input("model", model=True),
        ),
        outputs=(*schema.MODEL_FILES, CHECKPOINTS + "/"),
        needs=lambda cfg: ("torch", "transformers", "datasets", *(("peft",) if cfg.lora_rank else ())),
        result=TrainResult,
        summary=summary,
        resumable=True,  # checkpoints of an interrupted run with this fingerprint are resumed
        cli=Cli(
            arguments=("data",),
            sections=(
                (None, TrainConfig, tuple(f for f in TrainConfig.model_fields if f != "selection")),
                ("selection", SelectionOptions, tuple(SelectionOptions.model_fields)),
            ),
        ),
    )
)
run = runner(STAGE)
