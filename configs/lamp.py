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


def get_config(preset: str = "default"):
    c = _weibo.get_config(preset if preset in ("7b", "1.5b", "0.5b", "smollm2") else "default")
    c.preset = preset or "default"
    if c.preset not in ("default", "7b", "1.5b", "0.5b", "smollm2"):
        raise ValueError(f"unknown preset {preset!r} of configs/lamp.py; known: default, 7b, 1.5b, 0.5b, smollm2")
    c.data.source = "lamp"
    c.data.input = ""  # required: --config.data.input=DIR (or a questions file)
    c.data.cases_per_event = 1  # each question is its own event
    c.data.events_per_batch = 16
    c.data.max_length = 512 if c.preset == "default" else 1024
    c.lora.num_classes = 3  # the head exists (the pipeline stores 3-way targets) but gets no loss: lambdas are 0
    c.loss.lambda_sent = 0.0
    c.loss.lambda_macro = 0.0
    c.loss.max_response_tokens = 64
    c.train.generate_at_end = False  # sentiment/crowd evaluation does not apply; use launch/generate.py
    c.train.labeller = "none"
    return c
