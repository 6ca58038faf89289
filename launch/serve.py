"""A local web page that predicts the crowd for a news item, and its JSON API.

    python launch/serve.py --workdir runs/weibo-default [--host 127.0.0.1] [--port 8000]

Open http://127.0.0.1:8000/, paste a news item (and optionally a second wording), pick the
crowd (N users sampled from the run's dataset, or an uploaded users .jsonl) and read the
predicted distribution with its bootstrap intervals, the framing difference and a sample of
generated posts. The same as JSON: `POST /predict {"news": ..., "num_users": 20}` (fields in
socialalign_jax/predict/server.py) returns crowd.json's structure. Binds to 127.0.0.1 unless
told otherwise: there is no authentication. One prediction runs at a time; the model and
the compiled sampler stay loaded for the life of the process.
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
_DTYPE = define_dtype_flag()
flags.declare_key_flag("dtype")  # defined in core/cli_setup: --help lists it with this script's own flags
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (127.0.0.1: this machine only).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_USERS_FROM = flags.DEFINE_string("users_from", None, "Dataset (or run) directory that 'num_users' requests sample "
                                  "from (default: the run's own dataset).")
_MAX_USERS = flags.DEFINE_integer("max_users", 200, "Largest crowd one request may ask for.")
_MAX_SAMPLES = flags.DEFINE_integer("max_samples", 8, "Most posts per user one request may ask for.")


def main(argv):
    from socialalign_jax.core.errors import UserError, cli_main

    def go():
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not _WORKDIR.value:
            raise UserError("--workdir RUN is required (a training run directory)")
        if not 1 <= _PORT.value <= 65535:
            raise UserError(f"--port {_PORT.value}: expected 1..65535")
        for name, flag in (("--max_users", _MAX_USERS), ("--max_samples", _MAX_SAMPLES)):
            if flag.value < 1:
                raise UserError(f"{name} {flag.value}: expected an integer >= 1")
        import uvicorn

        from socialalign_jax.runs.restore import load_run_config
        from socialalign_jax.predict import Predictor, UsersError, dataset_users
        from socialalign_jax.predict.server import create_app

        predictor = Predictor.from_run(_WORKDIR.value, _STEP.value, dtype=_DTYPE.value, max_users=_MAX_USERS.value)
        source = _USERS_FROM.value
        if source is None:
            cfg = load_run_config(_WORKDIR.value)
            source = cfg.data.data_dir or os.path.join(_WORKDIR.value, "data")
        try:
            pool = dataset_users(source)
        except UsersError as e:
            if _USERS_FROM.value:
                raise
            pool = []
            print(f"note: no user pool ({e}); requests must send their users", file=sys.stderr)
        application = create_app(predictor, pool=pool, pool_source=source, max_users=_MAX_USERS.value,
                                 max_samples=_MAX_SAMPLES.value)
        print(f"serving {_WORKDIR.value} (step {predictor.run.get('step')}, {len(pool)} users to sample from) on "
              f"http://{_HOST.value}:{_PORT.value}/  (Ctrl-C to stop)", flush=True)
        uvicorn.run(application, host=_HOST.value, port=_PORT.value, log_level="warning")
        return 0

    cli_main(go)


if __name__ == "__main__":
    run_absl(main)
