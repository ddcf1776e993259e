r"""Data: the tokenizer, the synthetic pretraining corpus and the downstream tasks.

Sits beside training in the layers and imports nothing from the model: text
in, NumPy int64 arrays out. ``tokenizer`` maps the 96 reference characters to
ids; ``corpus`` writes the small world the base model learns, its bigram
baseline and the language-model batchers; ``tasks`` holds the downstream tasks
that fine-tuning is measured on.
"""

from .corpus import (
    TRAIN_FINGERPRINT,
    bigram_cross_entropy,
    fingerprint,
    generate_corpus,
    lm_batches,
    lm_windows,
    pretraining_text,
)
from .tasks import DEFAULT_TASK, MAX_EXAMPLE_CHARS, TASKS, TERMINATOR, Example, Task, get_task
from .tokenizer import IGNORE_INDEX, VOCAB, CharTokenizer

__all__ = [
    "DEFAULT_TASK",
    "IGNORE_INDEX",
    "MAX_EXAMPLE_CHARS",
    "TASKS",
    "TERMINATOR",
    "TRAIN_FINGERPRINT",
    "VOCAB",
    "CharTokenizer",
    "Example",
    "Task",
    "bigram_cross_entropy",
    "fingerprint",
    "generate_corpus",
    "get_task",
    "lm_batches",
    "lm_windows",
    "pretraining_text",
]
