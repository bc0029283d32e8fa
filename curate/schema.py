"""Names shared by every stage: Arrow schemas, file names and globs, and the quadrants of the EU plane.

List columns are `pa.list_` (32-bit offsets), never `large_list`: `datasets` refuses to concatenate the two.
"""

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
TOOLS_ROLE = "tools"  # in scores, a first message of this role holds the tool schemas (JSON text); pruned data has
# them in its `tools` column instead
MESSAGES = pa.list_(MESSAGE)

SCORES = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGES),
        ("input_ids", pa.list_(pa.int32())),
        ("trainable", pa.list_(pa.int8())),
        ("logprob", pa.list_(pa.float32())),  # log p(token_i | tokens_<i), nats; NaN at position 0
        ("entropy", pa.list_(pa.float32())),  # entropy of the distribution predicting token i; NaN at 0
        ("n_tokens", pa.int32()),
        ("n_trainable", pa.int32()),
        ("truncated", pa.bool_()),
        ("content_hash", pa.string()),  # hash of the canonical conversation: finds exact duplicates
    ]
)

# With `score --signals ifd`: each assistant turn's text scored alone (no template), its tokens after the first,
# pooled over the turns: the summed NLL (nats) and the number of tokens. ppl_alone = exp(alone_nll / alone_tokens).
ALONE = [("alone_nll", pa.float64()), ("alone_tokens", pa.int32())]

PRUNED = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGES),  # system/user/assistant/tool turns, as TRL's conversational format has them
        ("tools", pa.string()),  # the conversation's tool schemas as JSON text (TRL reads it so), null without tools
        ("input_ids", pa.list_(pa.int32())),
        ("attention_mask", pa.list_(pa.int8())),
        ("labels", pa.list_(pa.int32())),  # token id where it counts in the loss, -100 elsewhere
        ("loss_mask", pa.list_(pa.int8())),
        ("assistant_masks", pa.list_(pa.int8())),  # == loss_mask; TRL honours it with packing
        ("quadrant", pa.string()),  # Q1..Q4, median split
        ("selection", pa.string()),  # Q2 / Q4 / fill-Q2 / fill-Q4, or a baseline strategy's name
        ("ppl", pa.float64()),
        ("ent", pa.float64()),
    ]
)

IGNORE_INDEX = -100

# Possible scores: float rounding can put log p(token) a hair above 0, or an entropy a hair outside [0, log V].
LOGPROB_SLACK = 1e-3
ENTROPY_SLACK = 1e-3

# Files and folders. A stage's outputs are listed, with sizes and checksums, in its OUT/_manifest.json.
MANIFEST = "_manifest.json"
LOCK = ".curate.lock"
RUN_STAMP = ".run.json"  # the run a stage started in its folder, before its manifest exists
SCORES_GLOB = "part-*.parquet"
PRUNED_DATA = "data"
PRUNED_GLOB = "train-*.parquet"
SAMPLES = "samples.parquet"
STATS = "stats.json"

# What a trainer writes into OUT (`train`, `train-command`): the files of a model and its tokenizer
# (`save_pretrained`). A user's other files there are neither listed nor deleted.
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


def scores_shard(index: int) -> str:
    return f"part-{index:05d}.parquet"


def pruned_shard(index: int, count: int) -> str:
    return f"{PRUNED_DATA}/train-{index:05d}-of-{count:05d}.parquet"


# The EU plane: perplexity (error) horizontal, mean entropy (uncertainty) vertical.
QUADRANTS = ("Q1", "Q2", "Q3", "Q4")
QUADRANT_NAMES = {
    "Q1": "harmful noise",
    "Q2": "valuable misconception",
    "Q3": "redundant knowledge",
    "Q4": "calibration data",
}
QUADRANT_AXES = {
    "Q1": "high PPL, high entropy",
    "Q2": "high PPL, low entropy",
    "Q3": "low PPL, low entropy",
    "Q4": "low PPL, high entropy",
}
# Kept samples by selection, in the pictures.
SELECTION_COLOURS = {"Q2": "#d62728", "fill-Q2": "#ff9896", "Q4": "#1f77b4", "fill-Q4": "#aec7e8"}
