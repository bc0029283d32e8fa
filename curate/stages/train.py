"""`curate train DATA --model M --out DIR`: a small SFT trainer on transformers, honouring labels = -100.

It exists so the refresh loop and quick experiments work without another framework. The data path is the
one the tests prove: `datasets` Parquet -> input_ids/attention_mask/labels -> DataCollatorForSeq2Seq ->
transformers Trainer. With LoRA (peft) the adapter is merged before saving, so OUT is a plain model folder
that `curate score` (and any other tool) loads as is. OUT/_manifest.json is written last.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import io
from ..config import TrainConfig
from ..errors import CurateError
from ..executor import Job, identify_model, runner
from ..registry import register
from ..stage import Input, Manifest, Stage

CHECKPOINTS = "checkpoints"


def training_files(data: Path, manifest: dict | None) -> list[Path]:
    """The Parquet files to train on: those of a pruned folder (its manifest verified by the executor), or one Parquet
    file given explicitly."""
    if manifest is None:
        if data.suffix != ".parquet":
            raise CurateError(f"{data}: expected a .parquet file or a `curate prune` folder")
        return [data]
    files = io.pruned_data_files(data, manifest)
    if not files:
        raise CurateError(f"{data}: the pruned dataset is empty")
    return files


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
        raise CurateError(
            f"{files[0]}: column(s) {sorted(missing)} missing; train on the output of `curate prune` "
            "(or `curate export --format trl`)"
        )
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
        bf16=not on_cpu and torch.cuda.is_bf16_supported(),
        logging_steps=1,
        save_strategy="epoch",
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # raw log dicts on stdout; progress goes through `log` instead
    return trainer


def identify(job: Job) -> dict:
    job.context["files"] = training_files(job.inputs["data"], job.manifests.get("data"))
    return identify_model(job)


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
    dataset = load_training_table(files)
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
    log(
        f"training {model_ref.name} on {len(dataset):,} samples ({n_loss:,} loss tokens), "
        f"{'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tuning'}"
    )

    work = out / CHECKPOINTS  # Trainer checkpoints, so an interrupted run resumes; removed when done
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
    return {
        "base_model": model_ref.entry(),
        "config": {**cfg.model_dump(), "model": model_ref.name},
        "model": {"name": str(out), "path": str(out.resolve()), "base": model_ref.name},
        "counts": {"samples": len(dataset), "loss_tokens": n_loss, "steps": result.global_step},
        "train_loss": round(float(result.training_loss), 5),
        "loss_history": history,
    }


class TrainResult(Manifest):
    base_model: dict
    model: dict
    counts: dict[str, int]
    train_loss: float
    loss_history: list[dict]


def summary(m: TrainResult) -> list:
    c = m.counts
    last = m.loss_history[-1]["loss"] if m.loss_history else "n/a"
    return [
        f"trained {c['steps']:,} steps on {c['samples']:,} samples ({c['loss_tokens']:,} loss tokens), "
        f"final loss {last}; model: {m.config['out']}"
    ]


# What the trainer writes into OUT: the files of a model and its tokenizer (`save_pretrained`), and its
# checkpoints while it runs. A user's other files there are neither listed nor deleted.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
STAGE = register(
    Stage(
        name="train",
        produces="model",
        step=4,
        config=TrainConfig,
        doc="Fine-tune a model on pruned data with the built-in transformers trainer "
        "(labels = -100 are not in the loss).",
        compute=compute,
        identify=identify,
        inputs=(
            Input(
                "data",
                kind="pruned",
                file_ok=True,
                hint="no Parquet files to train on: give a `curate prune` folder or one .parquet file with input_ids "
                "and labels",
            ),
            Input("model", model=True),
        ),
        outputs=(*MODEL_FILES, CHECKPOINTS + "/"),
        needs=lambda cfg: ("torch", "transformers", "datasets", *(("peft",) if cfg.lora_rank else ())),
        result=TrainResult,
        summary=summary,
        resumable=True,  # checkpoints of an interrupted run with this fingerprint are resumed
        cli_arguments=("data",),
    )
)
run = runner(STAGE)
