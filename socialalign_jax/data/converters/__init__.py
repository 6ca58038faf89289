"""Converters from public Weibo corpora to events, registered as dataset sources.

    python launch/build_dataset.py --source ced|zs_csd|nlpcc2016 --input PATH --out DATA_DIR

Each reader returns `SourceEvents` (a list of `Event` with `source_info`: counts of what
was read, kept and skipped, and whether labels are silver); see docs/real_data.md.
"""

from socialalign_jax.data.converters.ced import read_ced
from socialalign_jax.data.converters.nlpcc2016 import LABELS as STANCE_LABELS
from socialalign_jax.data.converters.nlpcc2016 import read_nlpcc2016
from socialalign_jax.data.converters.zs_csd import read_zs_csd
from socialalign_jax.data.tfds_builders import SOURCES, register_source

__all__ = ["read_ced", "read_zs_csd", "read_nlpcc2016", "STANCE_LABELS"]

for _name, _reader, _labels in (("ced", read_ced, None), ("zs_csd", read_zs_csd, STANCE_LABELS),
                                ("nlpcc2016", read_nlpcc2016, STANCE_LABELS)):
    if _name not in SOURCES:
        register_source(_name, _reader, _labels)
