"""Evaluation of generated responses: micro metrics, macro distribution divergences, plots, the
zero-shot model labeller. The lexicon labeller, also used to give CED its silver labels, is data.labellers."""

from socialalign_jax.evaluation.distributions import KL_EPSILON, compare, jsd, kl, summarise, total_variation
from socialalign_jax.evaluation.metrics import (accuracy, chars, corpus_bleu, corpus_rouge, distinct_n, macro_f1,
                                                perplexity, rouge_l, rouge_n)

__all__ = [
    "KL_EPSILON", "compare", "jsd", "kl", "summarise", "total_variation",
    "accuracy", "chars", "corpus_bleu", "corpus_rouge", "distinct_n", "macro_f1", "perplexity", "rouge_l", "rouge_n",
]
