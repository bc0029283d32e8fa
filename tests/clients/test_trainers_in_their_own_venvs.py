"""LLaMA-Factory and axolotl, installed in their own virtualenvs, train on `curate export` output with their own
CLIs; the first logged loss equals our masked cross-entropy on the same first batch, so the masks hold inside
each trainer. LLaMA-Factory runs in `make test`; axolotl (a 4 GB install) in `make clients`."""

import json
import os
import re
import subprocess

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from curate.cli import app

from ..conftest import DEMO, data_files
from ..test_trainers import masked_ce
from .venvs import ensure

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """8 kept rows (16 demo rows at ratio 0.5): a trainer's first batch of 8 is the whole dataset, in any order."""
    d = tmp_path_factory.mktemp("clients")
    args = [
        ["score", str(DEMO), "--out", str(d / "scores"), "--model", str(tiny_model_dir), "--limit", "16"],
        # drop-high: the masked-out tokens are the costly ones, so the masked loss differs clearly from the unmasked
        ["prune", str(d / "scores"), "--out", str(d / "pruned"), "--ratio", "0.5", "--token-order", "drop-high"],
        ["export", str(d / "pruned"), "--format", "llamafactory", "--out", str(d / "llamafactory")],
        ["export", str(d / "pruned"), "--format", "axolotl", "--out", str(d / "axolotl")],
    ]
    for a in args:
        res = runner.invoke(app, a)
        assert res.exit_code == 0, res.output
    rows = pq.read_table(data_files(d / "pruned")).to_pylist()
    assert len(rows) == 8
    return d, rows


@pytest.fixture(scope="module")
def reference(exported, tiny_model_dir):
    """The masked cross-entropy over the kept tokens, and the one over every trainable token (which must differ)."""
    from transformers import AutoModelForCausalLM

    _, rows = exported
    trainable = {r["id"]: r["trainable"] for r in pq.read_table(exported[0] / "scores").to_pylist()}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        kept = float(masked_ce(model, rows))
        unpruned = float(masked_ce(model, [{**r, "full": trainable[r["id"]]} for r in rows], "full"))
    assert abs(kept - unpruned) / kept > 1e-3  # otherwise these tests could not tell the masks apart
    return kept


def run_trainer(venv, args, cwd, timeout=900) -> str:
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "DISABLE_VERSION_CHECK": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",  # its telemetry thread keeps the process alive when the network is closed
        "DO_NOT_TRACK": "1",
    }
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.llamafactory
def test_llamafactory_trains_on_the_export_with_our_masks(exported, reference, tmp_path):
    venv = ensure("llamafactory")
    d, _ = exported
    cfg = yaml.safe_load((d / "llamafactory" / "llamafactory_sft.yaml").read_text())
    # CPU settings and a 2-step run; everything else as the export wrote it
    cfg.update(
        max_steps=2,
        logging_steps=1,
        gradient_accumulation_steps=1,
        output_dir=str(tmp_path / "out"),
        report_to="none",
        save_strategy="no",
        overwrite_output_dir=True,
    )
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(cfg))
    run_trainer(venv, [str(venv / "bin" / "llamafactory-cli"), "train", str(tmp_path / "cpu.yaml")], tmp_path)
    logs = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    first = next(entry["loss"] for entry in logs if "loss" in entry)
    assert abs(first - reference) / reference < 1e-3, (first, reference)


@pytest.mark.axolotl
def test_axolotl_trains_on_the_export_with_our_masks(exported, reference, tmp_path, tiny_model_dir):
    venv = ensure("axolotl")
    d, _ = exported
    cfg = yaml.safe_load((d / "axolotl" / "axolotl.yaml").read_text())
    # CPU settings and a 2-step run; axolotl's fused LoRA kernels need a GPU
    cfg.update(
        micro_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=2,
        logging_steps=1,
        output_dir=str(tmp_path / "out"),
        bf16=False,
        fp16=False,
        tf32=False,
        save_strategy="no",
        lora_mlp_kernel=False,
        lora_qkv_kernel=False,
        lora_o_kernel=False,
        sample_packing=False,
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(cfg))
    out = run_trainer(venv, [str(venv / "bin" / "axolotl"), "train", str(tmp_path / "cpu.yaml")], tmp_path, 1800)
    losses = [float(x) for x in re.findall(r"'loss': '?([0-9.]+)", out)]
    assert losses, out[-3000:]
    assert abs(losses[0] - reference) / reference < 1e-3, (losses[0], reference)
