"""q-curate: Q-Tuning data curation for supervised fine-tuning (arXiv 2509.23873).

Every stage is a function of this package, with the command's options as keywords: `curate.score(...)`,
`curate.prune(...)`, `curate.train(...)`, ... (see `curate.api`)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    import importlib.util

    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(name)  # a submodule not imported yet: the import system loads it
    from .api import stage_function

    return stage_function(name)
