"""Raw records (and the authors' Alpaca files), BM25 history selection, the prompt builder, the
tfds builders, the lexicon labeller that gives unlabelled sources silver labels, and the sample."""

from socialalign_jax.data.records import (
    DEFAULT_LABELS,
    Case,
    DataError,
    Event,
    HistoryPost,
    read_event_dir,
    read_event_file,
)
from socialalign_jax.data.alpaca import read_alpaca
from socialalign_jax.data.bm25 import BM25, bm25_scores, select_history
from socialalign_jax.data.prompt import BuildStats, PromptConfig, PromptTooLong, build_example

__all__ = [
    "DEFAULT_LABELS", "Case", "DataError", "Event", "HistoryPost", "read_alpaca", "read_event_dir",
    "read_event_file", "BM25", "bm25_scores", "select_history", "BuildStats", "PromptConfig",
    "PromptTooLong", "build_example",
]
