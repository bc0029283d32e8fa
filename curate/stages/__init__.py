"""The stages: each module is a compute function and its `Stage(...)` declaration (`curate.stage`); the
executor (`curate.executor`) runs them, and every module here is registered when `curate.registry` loads them."""
