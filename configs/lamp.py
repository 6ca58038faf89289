"""Personalised generation on LaMP (Salemi et al., 2023): LaMP-4 headlines, LaMP-5 titles, LaMP-7 tweets.

    python launch/train.py --config configs/lamp.py --config.data.input=/data/LaMP_4/dev   # dir with
        *questions*.json and *outputs*.json (or a questions file + --config.data.lamp_outputs=FILE;
        --config.data.lamp_task=LaMP-4|LaMP-5|LaMP-7 when the outputs file does not say)
    python launch/train.py --config configs/lamp.py:7b --config.model.weights=hf:/ckpt/Qwen2.5-7B-Instruct \\
        --config.data.input=/data/LaMP_4/train

Each question is its own event (one case per event), and LaMP has no sentiment labels, so the
run trains the response loss only: lambda_sent =
lambda_macro = 0. The user span holds the retrieved profile items, the news span the input,
so PAC-LoRA's gates read them as they read the Weibo user and news.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_weibo_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "weibo.py"))
_weibo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_weibo)

# On top of configs/weibo.py's preset of the same name: only what LaMP changes.
LAMP = {
    "data": {"source": "lamp",  # and --config.data.input=DIR (or a questions file): LaMP is not bundled
             "cases_per_event": 1,  # each question is its own event
             "events_per_batch": 16},
    # No sentiment labels: the 3-class head exists (the pipeline stores 3-way targets) but gets no loss.
    "loss": {"lambda_sent": 0.0, "lambda_macro": 0.0, "max_response_tokens": 64},
    # Sentiment/crowd evaluation does not apply; use launch/generate.py.
    "train": {"generate_at_end": False, "labeller": "none"},
}


def lamp_settings(preset: str) -> dict:
    """LAMP plus the prompt length: 512 tokens on the CPU default, the paper's otherwise."""
    max_length = 512 if (preset or "default") == "default" else _weibo.PAPER_MAX_LENGTH
    return {**LAMP, "data": {**LAMP["data"], "max_length": max_length}}


def get_config(preset: str = "default"):
    if (preset or "default") not in _weibo.PRESETS:
        raise ValueError(f"unknown preset {preset!r} of configs/lamp.py; known: {', '.join(_weibo.PRESETS)}")
    return _weibo.config_dict(_weibo.typed_config(preset, lamp_settings(preset)).to_dict())
