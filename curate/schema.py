"""Column names and Arrow schemas: the single source of truth for every file we write.

List columns are `pa.list_` (32-bit offsets), never `large_list`: `datasets` refuses to concatenate the two.
"""

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
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
    ]
)

PRUNED = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGES),
        ("input_ids", pa.list_(pa.int32())),
        ("attention_mask", pa.list_(pa.int8())),
        ("labels", pa.list_(pa.int32())),  # token id where it counts in the loss, -100 elsewhere
        ("loss_mask", pa.list_(pa.int8())),
        ("assistant_masks", pa.list_(pa.int8())),  # == loss_mask; TRL honours it with packing
        ("quadrant", pa.string()),  # Q1..Q4, median split
        ("selection", pa.string()),  # Q2 / Q4 / fill-Q2 / fill-Q4
        ("ppl", pa.float64()),
        ("ent", pa.float64()),
    ]
)

IGNORE_INDEX = -100
SCORES_GLOB = "part-*.parquet"
