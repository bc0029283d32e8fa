"""What each kind of output carries, declared once: a contract per kind (scores, pruned, model), the manifest fields
every output of that kind has, whichever stage produced it.

The executor checks a producer against its kind's contract before it writes the manifest (a missing or mistyped
field is refused), fills in what a stage that consumes and produces one kind (a filter between score and prune) does
not say itself from its input, and hands each input of a kind to its consumer typed as the contract. A default here
is what a manifest written by an older q-curate meant by leaving the field out; a producer must still write it.
"""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from .errors import CurateError
from .stage import Manifest


class Scores(Manifest):
    """Per-token log-probs and entropies (`curate score`): how they were computed, which a filter keeps."""

    model: dict  # the scoring model: name, path (its tokenizer made the ids), hash
    vocab_size: int
    keep_fields: list[str] = []  # input fields carried as columns (for --group-by)
    signals: list[str] = []  # extra signals scored (ifd)
    score_positions: str = "all"  # all, or trainable (entropies of the answers only)
    source: dict = {}  # the input as read: files, subset, split
    dtype: dict = {}  # the dtype it was scored in, and why
    chat_template_hash: str | None = None
    # identical conversations: groups, later_copies, dropped (--dedup), first_ids; an older q-curate counted none
    duplicates: dict = {"groups": 0, "later_copies": 0, "dropped": False, "first_ids": []}


class Pruned(Manifest):
    """Training data with loss masks (`curate prune`, `curate retokenize`)."""

    model: dict  # whose tokenizer made the ids
    stats: dict  # the selection's figures: N, K, the quadrants, the token pruning


class Model(Manifest):
    """A trained model folder (`curate train`, `curate train-command`)."""

    base_model: dict  # the model it started from


CONTRACTS: dict[str, type[Manifest]] = {"scores": Scores, "pruned": Pruned, "model": Model}


def register(kind: str, contract: type[Manifest]) -> type[Manifest]:
    CONTRACTS[kind] = contract
    return contract


def contract(kind: str) -> type[Manifest]:
    """The contract of `kind`; a kind without one carries only what every manifest has."""
    return CONTRACTS.get(kind, Manifest)


def fields(kind: str) -> list[str]:
    """The fields a manifest of `kind` carries beyond every manifest's own."""
    return [name for name in contract(kind).model_fields if name not in Manifest.model_fields]


def problems(kind: str, produced: dict) -> list[str]:
    """What a producer's manifest fields lack of `kind`'s contract, or give in another type."""
    found = []
    for name in fields(kind):
        if name not in produced:
            found.append(f"{name} (missing)")
            continue
        annotation = contract(kind).model_fields[name].annotation
        try:
            TypeAdapter(annotation).validate_python(produced[name])
        except ValidationError:
            found.append(f"{name} (not {getattr(annotation, '__name__', annotation)})")
    return found


def typed(manifest: dict, kind: str, where: str) -> Manifest:
    """A verified manifest of `kind` as its contract, for the stage that consumes it."""
    try:
        return contract(kind).model_validate(manifest)
    except ValidationError as e:
        lacking = ", ".join(".".join(map(str, err["loc"])) for err in e.errors())
        raise CurateError(
            f"{where}: its manifest does not carry what {kind} carries ({lacking}); rerun the stage that wrote it"
        ) from None
