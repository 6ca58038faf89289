"""configs/lamp.py trains on a tiny LaMP fixture (published format) with the response loss only."""

import json
import math

import numpy as np

from socialalign_jax.data import lamp
from socialalign_jax.train import loop

from tests.train_helpers import read_metrics, tiny_config


PREFIX = lamp.INPUT_PREFIXES["LaMP-4"]


def write_lamp(d, n=8):
    rs = np.random.default_rng(0)
    words = ["volcano", "market", "park", "river", "election", "storm", "museum", "bridge", "festival", "train"]
    qs, golds = [], []
    for i in range(n):
        w = [words[j] for j in rs.choice(len(words), 3, replace=False)]
        qs.append({"id": str(100 + i), "input": PREFIX + f"The {w[0]} near the {w[1]} is in the news.",
                   "profile": [{"id": f"{i}-{k}", "title": f"{w[k]} story", "text": f"about the {w[k]} today"}
                               for k in range(3)]})
        golds.append({"id": str(100 + i), "output": f"{w[0].title()} and {w[1]}"})
    d.mkdir(parents=True, exist_ok=True)
    (d / "dev_questions.json").write_text(json.dumps(qs))
    (d / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_4", "golds": golds}))


def test_lamp_config_trains_two_steps_on_the_response_loss_only(tmp_path):
    write_lamp(tmp_path / "lamp")
    cfg = tiny_config(None, config="lamp", **{"train.num_steps": 2, "data.events_per_batch": 8,
                                              "data.input": str(tmp_path / "lamp"), "train.eval_at_end": True})
    assert cfg.data.source == "lamp" and cfg.data.cases_per_event == 1
    assert cfg.loss.lambda_macro == 0.0 and cfg.loss.lambda_sent == 0.0
    res = loop.train(cfg, str(tmp_path / "run"), progress=False)
    assert res["step"] == 2
    losses = read_metrics(str(tmp_path / "run"))
    lm = read_metrics(str(tmp_path / "run"), "train/lm")
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    assert losses == lm  # no sentiment or macro term
    assert math.isfinite(res["eval"]["response_ce"]) and "sentiment_accuracy" not in res["eval"]
