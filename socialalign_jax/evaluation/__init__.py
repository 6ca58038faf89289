"""Evaluation of generated responses: micro metrics, macro distribution divergences, labellers, plots."""

from socialalign_jax.evaluation.distributions import KL_EPSILON, compare, jsd, kl, summarise, total_variation
from socialalign_jax.evaluation.labellers import DEFAULT_LABELS, Labeller, LexiconLabeller, ZeroShotLabeller
from socialalign_jax.evaluation.metrics import (accuracy, chars, corpus_bleu, corpus_rouge, distinct_n, macro_f1,
                                                perplexity, rouge_l, rouge_n)

__all__ = [
    "KL_EPSILON", "compare", "jsd", "kl", "summarise", "total_variation",
    "DEFAULT_LABELS", "Labeller", "LexiconLabeller", "ZeroShotLabeller",
    "accuracy", "chars", "corpus_bleu", "corpus_rouge", "distinct_n", "macro_f1", "perplexity", "rouge_l", "rouge_n",
]
