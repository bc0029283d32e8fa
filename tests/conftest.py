"""Shared fixtures: a tiny Llama model and tokenizer built here, and the embedded SmolLM2."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """The shared datasets: CURATE_SHARED_DATA, else beside the checkout (../shared/data), else beside the
    checkout this one was cloned from (a fresh clone made elsewhere, as CI makes one)."""
    if "CURATE_SHARED_DATA" in os.environ:
        return Path(os.environ["CURATE_SHARED_DATA"])
    candidates = [ROOT.parent / "shared" / "data"]
    try:
        origin = subprocess.run(
            ["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        origin = ""
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHARED = shared_data()
# Where the data is missing a test is skipped, except in CI (CI=true), where a skip would prove nothing.
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir() and not os.environ.get("CI"),
    reason=f"shared datasets not found at {SHARED} "
    "(set CURATE_SHARED_DATA to the folder holding gsm8k/, alpaca_demo/, glaive_toolcall/)",
)
DEMO = ROOT / "curate" / "data" / "demo.jsonl"
GSM8K_TEST = SHARED / "gsm8k" / "test.jsonl"
ALPACA = SHARED / "alpaca_demo" / "alpaca_en_demo.json"
GLAIVE = SHARED / "glaive_toolcall" / "glaive_toolcall_en_demo.json"

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(
    chat_template: str | None = CHATML,
    vocab_size: int = 400,
    eos: str = "<|im_end|>",
    words: bool = True,
    chatml_tokens: bool = True,
):
    """A byte-level BPE tokenizer trained on the demo data, with ChatML special tokens. `words=False` lets its
    tokens run across spaces, so its boundaries cross those of a word-level one; `chatml_tokens=False` makes a
    base model's tokenizer, for which `<|im_start|>` and `<|im_end|>` are plain text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=words)
    tok.decoder = decoders.ByteLevel()
    corpus = open(DEMO).read().splitlines() + ["the quick brown fox jumps over the lazy dog 0123456789 + - * / = ?"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if chatml_tokens else ["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>" if chatml_tokens else None,
    )
    fast.chat_template = chat_template
    return fast


def build_tiny_model_dir(path: Path, chat_template: str | None = CHATML, tokenizer=None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tiny_tokenizer(chat_template)
    torch.manual_seed(0)
    # head_dim 32 (64 / 2 heads) so vLLM can load the same fixture.
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so entropies vary between positions
        model.lm_head.weight.mul_(40)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Tests that load the built-in SmolLM2 or start Ray are `slow`: `make test` runs them, `make test-fast` does not.
HEAVY_FIXTURES = {"smollm2_dir", "smollm2_gsm8k", "local_ray"}
# `make test` runs the tests in parallel processes (pytest-xdist, --dist loadgroup). Tests of one group run in one
# process: those that start a Ray cluster ("ray"), and those that start a vLLM engine (one at a time: two on 2 cores
# would only thrash) with those sharing the 64 scored GSM8K rows ("vllm": one vLLM test compares against those rows,
# which are then scored once, not once per process).
GROUP_BY_FIXTURE = {"smollm2_gsm8k": "vllm", "local_ray": "ray"}

# Every parallel test process gets its share of the cores, so N processes never spin N x cores torch threads. Set
# before any test module imports torch; the commands the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))


# Ray starts its workers at nice 15: beside the other test process (or any busy process) they would wait for it, and a
# 2-minute Ray test would take 10. The tests test no scheduling priority.
os.environ.setdefault("RAY_worker_niceness", "0")


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if HEAVY_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        groups = sorted({GROUP_BY_FIXTURE[f] for f in fixtures if f in GROUP_BY_FIXTURE})
        if groups and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(groups[0]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from curate.models import ensure_builtin

    return ensure_builtin()


GSM8K_FIELDS = "prompt=question,response=answer"


@pytest.fixture(scope="session")
def smollm2_gsm8k(tmp_path_factory, smollm2_dir) -> tuple[Path, str]:
    """The first 64 GSM8K test rows scored once by the built-in SmolLM2 through the CLI (transformers, float32,
    shards of 16): the reference the score, prune, vLLM and Ray tests share. (scores folder, CLI output)."""
    from typer.testing import CliRunner

    from curate.cli import app

    out = tmp_path_factory.mktemp("smollm2-gsm8k") / "scores"
    args = ["score", str(GSM8K_TEST), "--fields", GSM8K_FIELDS, "--limit", "64", "--dtype", "float32"]
    res = CliRunner().invoke(app, [*args, "--backend", "hf", "--shard-size", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


@functools.cache
def _reference_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_scores(model_dir: Path, ids):
    """Independent reference: one plain forward pass, logits -> torch.log_softmax, no chunking, no batching."""
    import torch

    model = _reference_model(Path(model_dir))  # loaded once per model, not once per sequence
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    lp = logp[:-1].gather(-1, torch.tensor(ids[1:], dtype=torch.long)[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)[:-1]
    return lp.numpy(), ent.numpy()


class Recorder:
    """A Reporter that keeps the log lines and calls `on_advance(done, tokens)` (to interrupt a run, say)."""

    def __init__(self, on_advance=None):
        self.logs: list[str] = []
        self.on_advance = on_advance

    def log(self, message):
        self.logs.append(message)

    def start(self, label, total, unit="rows"):
        pass

    def advance(self, done, tokens=0):
        if self.on_advance:
            self.on_advance(done, tokens)

    def finish(self):
        pass


def restamp(folder: Path) -> None:
    """Record the current bytes of a stage's files in its manifest, as if the stage had written them: tests that
    plant impossible values must get past the checksums to reach the value checks."""
    from curate import io

    manifest = io.read_json(folder / "_manifest.json")
    manifest["files"] = [
        io.file_entry(folder, f["name"], **{k: v for k, v in f.items() if k not in ("name", "bytes", "blake2b")})
        for f in manifest["files"]
    ]
    io.write_json_atomic(folder / "_manifest.json", manifest)


def kill_when(cmd: list[str], ready, timeout: float = 300) -> None:
    """Start `cmd`, SIGKILL it as soon as `ready()` holds (it must not have finished by then)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the command finished before the point where it was to be killed"
            assert time.time() < deadline, "the kill point was never reached"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A run folder (scores/ + pruned/) of 40 demo rows scored by the tiny model, half of them kept."""
    from curate.config import PruneConfig, ScoreConfig
    from curate.stages import prune, score

    run = tmp_path_factory.mktemp("tiny-run")
    score.run(ScoreConfig(input=str(DEMO), out=str(run / "scores"), model=str(tiny_model_dir), limit=40, shard_size=16))
    prune.run(PruneConfig(scores=str(run / "scores"), out=str(run / "pruned"), ratio=0.5, token_ratio=0.5))
    return run


def data_files(pruned: Path) -> list[Path]:
    return sorted((pruned / "data").glob("train-*.parquet"))


def cpu_sft_args(output_dir: Path, max_steps: int, **overrides):
    """TRL settings for a few exact fp32 steps on CPU, with nothing saved or reported."""
    from trl import SFTConfig

    settings = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        max_length=4096,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    return SFTConfig(**(settings | overrides))


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1 (the one s3fs's own tests use), reached as the real S3 is: through
    the environment (endpoint, credentials), which subprocesses and Ray workers inherit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket (s3://NAME) for one test."""
    import s3fs

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid()}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    return f"s3://{name}"
