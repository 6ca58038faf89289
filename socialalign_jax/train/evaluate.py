"""The trainer's held-out evaluation: response CE and the sentiment head's metrics on a split, and
how the run's crowd forecasts did against the training prior (the forecast skill).

Run by the evaluation hook (train/hooks.py `EvalHook`) at step 0 and at the end of a run.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from socialalign_jax.core.buckets import bucket
from socialalign_jax.data.pipeline import eval_batches, Subset
from socialalign_jax.evaluation import skill
from socialalign_jax.evaluation.head import head_metrics
from socialalign_jax.model import backend
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.parallel import sharding
from socialalign_jax.parallel.mesh import platform_of
from socialalign_jax.runs.run_config import RunConfig
from socialalign_jax.train import step as step_lib
from socialalign_jax.train.job import global_batch, Job


def eval_source(cfg: RunConfig, source):
    """The examples of a split the trainer evaluates: all, or `train.eval_max_examples` evenly spaced ones
    (data.pipeline.Subset: the same ones at step 0 and at the end)."""
    limit = cfg.train.eval_max_examples
    return source if limit <= 0 else Subset(source, limit)


@functools.lru_cache(maxsize=8)
def _jitted_eval_step(model_cfg: ModelConfig, lora_cfg: LoraConfig, loss_cfg, mesh, rules):
    """One jitted eval step per (model, adapters, loss, mesh): evaluations after the first (step 0,
    the end, every split) reuse its compilation instead of building a new jax.jit each call."""
    model_cfg, lora_cfg = backend.resolve_for_platform(model_cfg, lora_cfg, platform_of(mesh))
    return jax.jit(sharding.under_mesh(step_lib.make_eval_step(model_cfg, lora_cfg, loss_cfg), mesh, rules))


def evaluate_split(job: Job, adapters, source, *, desc: str = "eval", per_event: bool = False) -> dict[str, Any]:
    """Held-out response CE, sentiment accuracy and cross-entropy / majority baseline, and mean event JSD.
    per_event: also return each event's forecast (the mean head distribution) under '_per_event'."""

    eval_step = _jitted_eval_step(job.model_cfg, job.lora_cfg, job.loss_cfg, job.mesh, job.rules)
    bs = int(job.cfg.data.eval_batch_size)
    n_dev = sharding.batch_shards(job.mesh, job.rules)
    bs = bucket(bs, multiple=n_dev)  # every device gets the same number of rows
    lm_sum = lm_cnt = 0.0
    probs, labels, events, masks = [], [], [], []
    targets = {}
    for local in eval_batches(source, bs, job.data.seq_len, job.data.pad_id, job.lora_cfg.num_classes,
                              process_index=jax.process_index(), process_count=jax.process_count()):
        step_lib.check_response_lengths(local, job.loss_cfg.max_response_tokens, desc)
        batch = global_batch(local, job.mesh, job.rules)
        out = eval_step(job.params, adapters, batch)
        lm_sum += float(out["lm_sum"])
        lm_cnt += float(out["lm_count"])
        g = {k: np.asarray(multihost_utils.process_allgather(batch[k], tiled=True))
             for k in ("label", "event_id", "example_mask", "target_dist")}
        if "probs" in out:
            probs.append(np.asarray(multihost_utils.process_allgather(out["probs"], tiled=True)))
        labels.append(g["label"]), events.append(g["event_id"]), masks.append(g["example_mask"])
        for e, t in zip(g["event_id"], g["target_dist"]):
            targets.setdefault(int(e), t)
    res: dict[str, Any] = {"response_ce": lm_sum / max(lm_cnt, 1.0), "response_tokens": lm_cnt}
    labels, events, masks = np.concatenate(labels), np.concatenate(events), np.concatenate(masks)
    real = masks > 0
    if probs and (real & (labels >= 0)).any():
        # The same code as launch/evaluate.py's head metrics (evaluation.head); events whose
        # target is all zero (no labelled response anywhere) have no distribution to compare.
        hm = head_metrics(np.concatenate(probs)[real], labels[real], events[real],
                          {e: t for e, t in targets.items() if np.sum(t) > 0})
        res.update({k: hm[k] for k in ("sentiment_accuracy", "sentiment_macro_f1", "sentiment_ce",
                                       "majority_baseline_accuracy", "macro_jsd", "num_events")})
        if per_event:
            res["_per_event"] = hm["per_event"]
    res["num_examples"] = int((masks > 0).sum())
    return res


def forecast_track_record(job: Job, per_event: dict[int, list[float]], seed: int = 0) -> dict[str, Any]:
    """How the run's crowd forecasts (each held-out event's mean head distribution) did against the
    training prior (the pooled mix of the training events' targets), with the shrink weight that
    predictions will use (evaluation/skill.forecast_skill)."""
    ds = job.data.dataset
    splits = ds.metadata.get("targets", {})
    train = {e: t for e, t in ds.targets("train").items() if t["count"] > 0} if "train" in splits else {}
    test = ds.targets("test") if "test" in splits else {}
    events = [e for e in sorted(per_event) if e in test and test[e]["count"] > 0]
    if not train:
        return {"num_events": len(events), "status": "none", "w": 1.0, "reason": "no training targets"}
    es = sorted(train)
    prior = skill.prior(np.asarray([train[e]["dist"] for e in es]), np.asarray([train[e]["count"] for e in es]))
    floors = [np.nan if test[e].get("noise_floor") is None else test[e]["noise_floor"] for e in events]
    rec = skill.forecast_skill(np.asarray([per_event[e] for e in events]).reshape(len(events), len(prior)),
                               np.asarray([test[e]["dist"] for e in events]).reshape(len(events), len(prior)),
                               prior, noise_floor=np.asarray(floors), seed=seed)
    rec["labels"] = list(job.data.labels)
    return rec
