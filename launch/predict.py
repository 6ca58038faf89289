"""Predict how a crowd will respond to a news item that has not happened yet, per user and as a crowd.

    python launch/predict.py --workdir runs/weibo-default --news "某地宣布明年起延迟退休" \
        --users examples/users.jsonl --out pred/ [--topic 延迟退休] [--samples 4] [--seed 0]
    # framing: the same crowd and hashtag under two wordings, with paired differences and a verdict
    # (which names a wording only for 30 users or more)
    python launch/predict.py --workdir RUN --news "TEXT 1" --news "TEXT 2" --users_from RUN --num_users 40 --out pred/
    # exported adapters on a base model instead of a run directory
    python launch/predict.py --adapters export/ --weights gguf:smollm2 --news ... --users ... --out pred/

--workdir is a training run: its saved config (nothing to repeat), base weights and latest
checkpoint are used. Writes OUT/predictions.jsonl (per user and sample: post, sentiment),
OUT/crowd.json (the distribution with its bootstrap interval, per wording, and the framing
differences), OUT/report.md and OUT/crowd.png, all at once: nothing is left under --out
when anything fails. Bad input stops with one line naming the file, line and field (exit 2).
A run on random weights (the embedded default) says so first in every output, and report.md
lists its posts only with --show_posts: they are not text.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from socialalign_jax.core.cli_setup import define_dtype_flag, quiet_startup, run_absl  # noqa: E402

quiet_startup()

from absl import flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory (saved config + checkpoints).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_ADAPTERS = flags.DEFINE_string("adapters", None, "Exported adapters (launch/export.py) instead of --workdir.")
_WEIGHTS = flags.DEFINE_string("weights", None, "With --adapters: the base weights (gguf:smollm2, hf:DIR, ...).")
_MODE = flags.DEFINE_enum("mode", None, ["full", "without_persona", "without_history"],
                          "With --adapters: the prompt mode the adapters were trained with (default: full).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "With --adapters: the longest prompt, in tokens "
                                   "(default: the paper's 1024).")
_NEWS = flags.DEFINE_multi_string("news", [], "The news text; give it several times to compare wordings.")
_VARIANTS = flags.DEFINE_string("variants", None, "A UTF-8 file with more wordings of the news, one per line.")
_TOPIC = flags.DEFINE_string("topic", None, "The hashtag (default: the news's #hashtag#, else its first clause).")
_USERS = flags.DEFINE_string("users", None, "USERS.jsonl: one {user_name, history, user_persona?} per line.")
_USERS_FROM = flags.DEFINE_string("users_from", None, "Sample the crowd from this built dataset (or run) directory.")
_NUM_USERS = flags.DEFINE_integer("num_users", 0, "With --users_from: how many users to sample.")
_OUT = flags.DEFINE_string("out", None, "Output directory (predictions.jsonl, crowd.json, report.md, crowd.png).")
_SAMPLES = flags.DEFINE_integer("samples", 1, "Posts sampled per user (K).")
_DTYPE = define_dtype_flag()
flags.declare_key_flag("dtype")  # defined in core/cli_setup: --help lists it with this script's own flags
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampler, the user draw and the bootstrap.")
_LABELLER = flags.DEFINE_enum("labeller", "none", ["none", "lexicon", "zeroshot"],
                              "Also label the generated posts and report their distribution.")
_LABELLER_WEIGHTS = flags.DEFINE_string("labeller_weights", None, "With --labeller zeroshot: its model (gguf:smollm2).")
_LEVEL = flags.DEFINE_float("level", 0.9, "Bootstrap interval level.")
_RESAMPLES = flags.DEFINE_integer("resamples", 2000, "Bootstrap resamples.")
_MAX_USERS = flags.DEFINE_integer("max_users", 10_000, "Refuse crowds larger than this.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (--noprogress: none, e.g. in a log file).")
_SHOW_POSTS = flags.DEFINE_bool("show_posts", None, "List a sample of the generated posts in report.md (default: yes "
                                "for pretrained weights, no for random ones, whose posts are not text).")


def _read_variants(path: str) -> list[str]:
    from socialalign_jax.core.errors import UserError

    from socialalign_jax.core.jsonl import utf8_problem

    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except OSError as e:
        raise UserError(f"--variants {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--variants {path}: {utf8_problem(raw, e)}") from None
    out = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not out:
        raise UserError(f"--variants {path}: no wordings (one per line)")
    return out


def main(argv):
    from socialalign_jax.core.errors import UserError, cli_main

    def go():
        from socialalign_jax.predict import outputs, users as users_lib

        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
        # Everything that can be checked without the model is checked first.
        if bool(_WORKDIR.value) == bool(_ADAPTERS.value):
            raise UserError("give --workdir RUN (a training run) or --adapters DIR --weights SPEC (an export)")
        if _ADAPTERS.value and not _WEIGHTS.value:
            raise UserError("--adapters needs --weights SPEC (the base model they were trained on)")
        outputs.check_out_dir(_OUT.value)
        wordings = list(_NEWS.value) + (_read_variants(_VARIANTS.value) if _VARIANTS.value else [])
        if not wordings:
            raise UserError("--news TEXT is required (or --variants FILE)")
        for i, w in enumerate(wordings):
            if not w.strip():
                raise UserError(f"--news: wording {i + 1} is empty; give the news text to predict the response to")
        if bool(_USERS.value) == bool(_USERS_FROM.value):
            raise UserError("give the crowd as --users USERS.jsonl or --users_from DATASET_DIR --num_users N")
        if _USERS.value:
            crowd = users_lib.read_users(_USERS.value)
        else:
            if _NUM_USERS.value < 1:
                raise UserError("--users_from needs --num_users N (N >= 1)")
            if _NUM_USERS.value > _MAX_USERS.value:
                raise UserError(f"--num_users {_NUM_USERS.value}: more than --max_users {_MAX_USERS.value}")
            crowd = users_lib.sample_users(users_lib.dataset_users(_USERS_FROM.value), _NUM_USERS.value,
                                           _SEED.value, _USERS_FROM.value)
        if len(crowd) > _MAX_USERS.value:
            raise UserError(f"--users {_USERS.value}: {len(crowd)} users, more than --max_users {_MAX_USERS.value}")
        from socialalign_jax.predict.predictor import check_settings

        check_settings(samples=_SAMPLES.value, seed=_SEED.value, level=_LEVEL.value, num_resamples=_RESAMPLES.value,
                       prefix="--")
        labeller = _LABELLER.value
        if labeller == "zeroshot" and not _LABELLER_WEIGHTS.value:
            raise UserError("--labeller zeroshot needs --labeller_weights SPEC (e.g. gguf:smollm2)")

        from socialalign_jax.predict import Predictor

        if _WORKDIR.value:
            predictor = Predictor.from_run(_WORKDIR.value, _STEP.value, dtype=_DTYPE.value, max_users=_MAX_USERS.value)
        else:
            predictor = Predictor.from_adapters(_ADAPTERS.value, _WEIGHTS.value, mode=_MODE.value,
                                                max_length=_MAX_LENGTH.value, dtype=_DTYPE.value,
                                                max_users=_MAX_USERS.value)
        if labeller == "zeroshot":
            from socialalign_jax.evaluation.model_labeller import zero_shot_labeller
            labeller = zero_shot_labeller(_LABELLER_WEIGHTS.value)
        pred = predictor.predict(wordings[0], crowd, topic=_TOPIC.value, samples=_SAMPLES.value, seed=_SEED.value,
                                 variants=wordings[1:], labeller=labeller, level=_LEVEL.value,
                                 num_resamples=_RESAMPLES.value, progress=_PROGRESS.value)
        paths = outputs.write_outputs(pred, _OUT.value, show_posts=_SHOW_POSTS.value)
        print("\n" + outputs.summary_table(pred))
        print("wrote " + ", ".join(paths))
        return 0

    cli_main(go)


if __name__ == "__main__":
    run_absl(main)
