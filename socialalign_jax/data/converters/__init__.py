"""Converters from public Weibo corpora to events; data/tfds_builders.py lists them as dataset sources.

    python launch/build_dataset.py --source ced|zs_csd|nlpcc2016 --input PATH --out DATA_DIR

Each reader returns `SourceEvents` (a list of `Event` with `source_info`: counts of what
was read, kept and skipped, and whether labels are silver); see docs/real_data.md.
"""

from socialalign_jax.data.converters.ced import read_ced
from socialalign_jax.data.converters.common import STANCE_LABELS
from socialalign_jax.data.converters.nlpcc2016 import read_nlpcc2016
from socialalign_jax.data.converters.zs_csd import read_zs_csd

__all__ = ["read_ced", "read_zs_csd", "read_nlpcc2016", "STANCE_LABELS"]
