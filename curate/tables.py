"""Figures that several stages table and draw: mean and sd over seeds, the corrupted share of what a strategy kept,
and matplotlib set up to draw into files. The probe, the experiment and the report share them (one definition)."""

from __future__ import annotations

from collections.abc import Collection, Iterable

import numpy as np


def mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (sd 0 for one value)."""
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def kept_share(kept: Iterable[str], bad: Collection[str]) -> dict:
    """How many samples were kept, how many of them are corrupted (`bad` ids), and that share."""
    ids = list(kept)
    hit = sum(i in bad for i in ids)
    return {"kept": len(ids), "corrupted": hit, "share": hit / len(ids) if ids else 0.0}


def pyplot():
    """matplotlib's pyplot on the Agg backend: pictures into files, never a window (and no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
