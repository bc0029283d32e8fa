"""`curate evaluate`: a model's answer NLL (and its final-answer NLL) on held-out rows, and GSM8K exact match
on the first of them, into OUT/eval.json. `curate experiment` evaluates every arm with it."""

from __future__ import annotations

import hashlib
import json

from .. import io
from ..config.evaluate import EvaluateConfig
from ..executor import Job, identify_model, runner
from ..registry import register
from ..stage import Cli, Input, Manifest, Stage


def rows_fingerprint(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps([r["id"] for r in rows]).encode()).hexdigest()[:16]


def compute(job: Job) -> dict:
    from .. import held_out as ev

    cfg, model = job.cfg, job.context["model"]
    nll_rows = ev.eval_rows(job.inputs["data"], cfg.fields, cfg.limit, cfg.skip)
    em_limit = cfg.limit if cfg.em_limit is None else cfg.em_limit
    em_rows = nll_rows[:em_limit] if em_limit is not None else nll_rows
    job.log(f"evaluating {model.name} on {len(nll_rows)} rows (NLL) and {len(em_rows)} rows (EM)")
    result = {
        "nll": ev.answer_nll(model.path, nll_rows, device=cfg.device),
        "rows": {"nll": len(nll_rows), "em": len(em_rows)},
        "nll_rows": rows_fingerprint(nll_rows),  # which rows: arms compared must have seen the same
        "em_rows": rows_fingerprint(em_rows),
    }
    if em_rows:
        result["em"] = ev.gsm8k_em(model.path, em_rows, cfg.max_new_tokens, cfg.batch_size, cfg.device)
    io.write_json_atomic(job.out / "eval.json", result)
    return {"model": model.entry(), "result": result}


class EvaluateResult(Manifest):
    model: dict
    result: dict


def summary(m: EvaluateResult) -> list:
    r = m.result
    em = f", exact match {r['em']['em']:.3f} on {r['rows']['em']:,} rows" if "em" in r else ""
    return [f"{m.model['name']}: answer NLL {r['nll']['nll']:.4f} on {r['rows']['nll']:,} rows{em}"]


STAGE = register(
    Stage(
        name="evaluate",
        produces="eval",
        config=EvaluateConfig,
        doc="A model's answer NLL on held-out rows and GSM8K exact match, into OUT/eval.json.",
        compute=compute,
        identify=identify_model,
        inputs=(Input("data", data=True, hint="held-out question/answer rows"), Input("model", model=True)),
        outputs=("eval.json",),
        needs=lambda cfg: ("torch", "transformers"),
        result=EvaluateResult,
        summary=summary,
        cli=Cli(arguments=("data",), first=("model", "out"), follows=("model",)),
    )
)
run = runner(STAGE)
