"""The sentiment label set, in class-id order: its one definition.

Here, in core/ (which imports nothing else of ours and nothing heavy), so that the config file,
the model configuration's validation, the data readers and builder, training, evaluation and
prediction all import the same tuple cheaply and cannot disagree on the order that turns a
class id back into a name. Stance corpora bring their own set (data/converters/common.py).
"""

DEFAULT_LABELS = ("negative", "neutral", "positive")
