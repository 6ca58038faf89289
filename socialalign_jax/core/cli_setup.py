"""Process-level setup shared by the launch scripts: a quiet, predictable start.

Imported before jax: it only sets environment variables and logging levels, so that a user
sees progress bars and results, not a wall of TensorFlow/absl/XLA warnings.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from socialalign_jax.core.dtypes import DTYPE_NAMES
from socialalign_jax.core.errors import one_line, UserError


def quiet_startup() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: every path is local
    skip_absent_tpu()
    use_compilation_cache()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Explicitly requested dtype.*")
    for name in ("absl", "orbax", "jax._src.xla_bridge", "tensorflow_datasets", "jieba", "etils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


COMPILATION_CACHE_ENV = "SOCIALALIGN_COMPILATION_CACHE"  # a directory, or "off"


def compilation_cache_dir(environ=os.environ) -> str | None:
    """Where XLA programs compiled by a launcher are kept between runs (None: not kept).

    $SOCIALALIGN_COMPILATION_CACHE (a directory, or "off"), else a JAX_COMPILATION_CACHE_DIR the
    user set, else the user's cache directory: $XDG_CACHE_HOME/socialalign_jax/xla-lru or
    ~/.cache/socialalign_jax/xla-lru. Entries are keyed by the program, the compiler flags and the jax
    version, so a stale one is never used; delete the directory to reclaim the space. (Not the `xla`
    directory earlier versions filled uncapped: its entries have no access-time files, and JAX's
    capped cache then warns on every write there.)
    """
    chosen = environ.get(COMPILATION_CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "false", "no") else chosen
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "socialalign_jax", "xla-lru")


COMPILATION_CACHE_MAX_BYTES = 4 << 30  # 4 GiB of compiled programs per user


def use_compilation_cache() -> None:
    """JAX's persistent compilation cache for every launcher, before jax is imported: the second
    `predict.py` (train.py, generate.py, serve.py, ...) on the same shapes loads its programs instead
    of compiling them again (tens of seconds on a CPU, minutes for a big model on a TPU slice).
    Programs that compiled in under a second are not stored (JAX's own default threshold).

    The cache is capped (COMPILATION_CACHE_MAX_BYTES, least recently used programs go first;
    JAX_COMPILATION_CACHE_MAX_SIZE overrides) for two reasons: a user-level directory must not
    grow without bound, and only a capped JAX cache takes its file lock around reads and writes.
    Uncapped, JAX writes an entry in place with no lock, so a second launcher compiling the same
    program at the same time can read half a file and hand it to XLA, which does not check it.
    (An entry a killed process left half-written is not covered: delete the directory.)
    """
    path = compilation_cache_dir()
    if path is None:
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    max_size = os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(COMPILATION_CACHE_MAX_BYTES))
    if "jax" in sys.modules:  # a caller that imported jax first (a library user): set it on the live config
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_compilation_cache_max_size", int(max_size))


def skip_absent_tpu() -> None:
    """On a host without a TPU but with libtpu installed (the [tpu] extra, for compiling against
    TPU topologies from a CPU), do not let JAX probe for a TPU: libtpu prints a multi-line
    metadata-server error on every start. Only when nothing chose the platforms already and
    the host has no TPU device nodes; a GPU is still found (JAX_PLATFORMS=cuda,cpu)."""
    import glob
    import importlib.util

    if "JAX_PLATFORMS" in os.environ or any(k in os.environ for k in ("TPU_NAME", "TPU_WORKER_HOSTNAMES")):
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*"):
        return
    if importlib.util.find_spec("libtpu") is not None:
        os.environ["JAX_PLATFORMS"] = "cuda,cpu"


_HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "--helpfull", "-helpfull", "-?",
               "--helpxml", "-helpxml")
EXIT_USAGE = 2  # usage errors: the conventional exit status, shared by every launcher


def usage_error(message: str, argv, see: str = "--help") -> None:
    """`error: <message> (python PROG --help)` on stderr and exit 2; `see` names the flag that explains
    (`--config_help` for an unknown config key)."""
    import sys

    prog = os.path.basename(argv[0]) if argv else "launcher"
    print(f"error: {one_line(message)} (python {prog} {see})", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def config_usage_error(e: BaseException, argv) -> None:
    """usage_error for what ml_collections raised (an unknown key points to --config_help)."""
    message = _config_problem(e, argv)
    usage_error(message, argv, "--config_help lists every key" if "unknown config key" in message else "--help")


def _config_problem(e: BaseException, argv) -> str:
    """One line for what ml_collections raised while loading a config file or applying `--config.a.b=v`."""
    if isinstance(e, AttributeError) and e.args and isinstance(e.args[0], KeyError):
        e = e.args[0]  # ml_collections wraps the KeyError of an unknown attribute
    if isinstance(e, (AttributeError, KeyError)):  # an override that names no key
        # KeyError's str() is the repr of its message; ml_collections' message is "'key'" and, when
        # a key is close, a second line 'Did you mean "num_steps" instead of "num_stepz"?'.
        first, _, rest = str(e.args[0] if e.args else e).partition("\n")
        key = first.strip("'\" ")
        hint = re.match(r'Did you mean "([^"]+)"', rest.strip())
        bad = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
               and key in a.split("=", 1)[0].split(".")]
        flag = bad[0] if bad else "--config"
        if hint:
            near = ".".join(flag.split(".")[:-1] + [hint.group(1)]) if bad else hint.group(1)
            return f"{flag}: unknown config key {key!r}; did you mean {near}?"
        return f"{flag}: unknown config key {key!r}"
    text = str(e)
    # config_flags wraps get_config's own error in a traceback text: keep its last line only.
    last = [ln.strip() for ln in text.splitlines() if re.match(r"\s*\w+(Error|Exception): ", ln)]
    if last:
        text = last[-1].split(": ", 1)[1]
    elif "No such file" in text:
        given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
        given += [b for a, b in zip(argv[1:], argv[2:]) if a == "--config"]
        path = given[0].split(":")[0] if given else "the config file"
        text = f"{path}: no such file"
    return f"--config: {text}"


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_config_path(spec: str) -> str:
    """`configs/weibo.py[:preset]` from any working directory: a relative config path that does
    not exist here but does in this checkout is taken from the checkout."""
    path, sep, preset = spec.partition(":")
    if path and not os.path.isabs(path) and not os.path.exists(path):
        candidate = os.path.join(_REPO, path)
        if os.path.exists(candidate):
            return candidate + sep + preset
    return spec


def load_config_file(spec: str, flag: str = "--config"):
    """The ConfigDict of `FILE[:preset]` (resolved as `resolve_config_path` does), for launchers with
    their own FlagValues (`parse_flags`); those on absl's global FLAGS use `define_config_flag`.
    A missing file or an unknown preset is one UserError line naming `flag`."""
    import importlib.util

    path, _, preset = resolve_config_path(spec).partition(":")
    if not os.path.isfile(path):
        raise UserError(f"{flag}: file {path} does not exist")
    mod_spec = importlib.util.spec_from_file_location("socialalign_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    try:  # a config file that does not load, or a preset it does not know: one line, not a traceback
        mod_spec.loader.exec_module(mod)
        return mod.get_config(preset) if preset else mod.get_config()
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{flag} {spec}: {type(exc).__name__}: {exc}" if not isinstance(exc, ValueError)
                        else f"{flag} {spec}: {exc}") from None


def config_dict(settings):
    """The ml_collections view of a run config's plain dict (`RunConfig.to_dict()`, a run's
    config.json): what a config file's get_config returns and `--config.a.b=v` overrides.

    A list setting is spelled as on the command line, comma-separated ('q,k,v'), so that
    `--config.lora.targets=q,v` is an ordinary, type-checked string override (ml_collections
    would parse a tuple field as a Python literal); `runs.run_config.names` reads it back.
    """
    from ml_collections import config_dict as ml_config_dict

    def cli(value):
        if isinstance(value, dict):
            return {k: cli(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return value

    return ml_config_dict.ConfigDict(cli(dict(settings)))


def config_keys(cfg, prefix: str = "") -> list[str]:
    """Every leaf of a ConfigDict as `a.b = value  (type)`, in the config's order: what --config_help prints."""
    out = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out += config_keys(value, name + ".")
        else:
            out.append(f"  {name} = {value!r}  ({type(value).__name__})")
    return out


def _define_config_help() -> None:
    from absl import flags

    if "config_help" not in flags.FLAGS:
        flags.DEFINE_bool("config_help", False, "List every config key with its value (after --config and any "
                          "--config.a.b=v overrides) and exit; override one with --config.a.b=value.")


def define_dtype_flag():
    """`--dtype` of the launchers that predict (predict.py, serve.py): compute in another dtype than the
    run's saved model.dtype (or, with --adapters, the weights' own); `Predictor.from_run(dtype=...)`."""
    from absl import flags

    return flags.DEFINE_enum("dtype", None, list(DTYPE_NAMES),
                             "Compute in this dtype instead of the run's saved model.dtype (or, with --adapters, the "
                             "weights' own): bfloat16 predicted 1.3-1.6x faster on a CPU with AVX512-BF16 "
                             "(BENCHMARKS.md), within bf16 rounding of float32.")


def define_config_flag(name: str = "config", default: str = "configs/weibo.py", help_text: str = "Config file[:preset]."):
    """config_flags.DEFINE_config_file, whose overrides are parsed at definition time: a bad one is a usage error.

    The config path (default or given) resolves against the checkout when it is relative and
    absent from the working directory, so launchers run from anywhere."""
    import sys

    from ml_collections import config_flags

    flag = f"--{name}"
    for i, arg in enumerate(sys.argv):
        if arg.startswith(flag + "="):
            sys.argv[i] = flag + "=" + resolve_config_path(arg[len(flag) + 1:])
        elif arg == flag and i + 1 < len(sys.argv):
            sys.argv[i + 1] = resolve_config_path(sys.argv[i + 1])
    _define_config_help()
    try:
        return config_flags.DEFINE_config_file(name, resolve_config_path(default), help_text)
    except Exception as e:  # noqa: BLE001 - every failure here is in the user's command line
        config_usage_error(e, sys.argv)


def define_run_config_flag(default: str = "configs/weibo.py"):
    """`--config` for a launcher that reads a training run: the run's own saved config by default.

    When `--workdir DIR` names a run (DIR/config.json exists) and no `--config FILE` is given, the
    config is the one the run was trained with, so nothing given at training time has to be
    repeated; `--config.a.b=v` overrides still apply on top (e.g. `--config.sample.temperature`).
    Otherwise this is `define_config_flag`: a config file, as for training.
    """
    import json
    import sys

    from ml_collections import config_flags

    argv = sys.argv[1:]
    given_file = any(a == "--config" or a.startswith("--config=") for a in argv)
    workdir = None
    for i, a in enumerate(argv):
        if a.startswith("--workdir="):
            workdir = a.split("=", 1)[1]
        elif a == "--workdir" and i + 1 < len(argv):
            workdir = argv[i + 1]
    saved = os.path.join(workdir, "config.json") if workdir else None
    if given_file or not saved or not os.path.isfile(saved):
        return define_config_flag("config", default, "Config file[:preset] (default: the run's saved config.json).")
    try:
        with open(saved, encoding="utf-8") as f:
            cfg = config_dict(json.load(f))  # lists as comma strings, whichever way the run wrote them
    except (OSError, ValueError, TypeError, AttributeError) as e:
        usage_error(f"{saved}: not a readable run config ({e}); pass --config FILE instead", sys.argv)
    _define_config_help()
    try:
        return config_flags.DEFINE_config_dict("config", cfg, f"The run's saved config ({saved}); "
                                               "--config.a.b=v overrides a value, --config FILE replaces it.")
    except Exception as e:  # noqa: BLE001 - a bad override on the command line
        config_usage_error(e, sys.argv)


def absl_flags_parser(argv):
    """absl's flag parsing, as every launcher parses: --help exits 0, a usage error exits 2 in one line.

    absl alone exits 1 for both, and an unknown or mistyped `--config.a.b=v` override (ml_collections)
    escapes as a 50-line AttributeError; here every one of them is `error: <what> (python X --help)`.
    """
    import sys

    from absl import flags

    help_wanted = any(a in _HELP_FLAGS for a in argv[1:])
    try:
        rest = flags.FLAGS(argv)
    except SystemExit:  # absl's help flags print the usage and exit 1
        if help_wanted:
            sys.exit(0)
        raise
    except flags.Error as e:
        about_config = e.__cause__ is not None or "--config" in str(e).split(": ", 1)[0]
        if not about_config:  # an unknown or mistyped flag: absl's own first line names it
            usage_error(str(e).splitlines()[0], argv)
        config_usage_error(e.__cause__ or e, argv)
    except Exception as e:  # noqa: BLE001 - ml_collections: a bad override, preset or config file
        config_usage_error(e, argv)
    if "config" in flags.FLAGS:
        try:
            flags.FLAGS["config"].value.keys()  # loaded lazily: a missing file surfaces here
        except Exception as e:  # noqa: BLE001
            config_usage_error(e, argv)
        if "config_help" in flags.FLAGS and flags.FLAGS.config_help:
            print("config keys (override with --config.KEY=VALUE):")
            print("\n".join(config_keys(flags.FLAGS["config"].value)))
            sys.exit(0)
    return rest


def run_absl(main) -> None:
    """`absl.app.run(main)` with `absl_flags_parser` (the convention `parse_flags` also keeps)."""
    from absl import app

    app.run(main, flags_parser=absl_flags_parser)


def parse_flags(flag_values, argv, prog: str, doc: str = ""):
    """Parse `argv` (without the program name) into `flag_values`, a launcher's own absl FlagValues.

    For the launchers whose `main(argv)` is called in-process (tests load them under several module
    names and call main many times): their flags live in a FlagValues of their own rather than in
    absl's global FLAGS, so defining them twice is no DuplicateFlagError, and every call starts
    from the defaults (unparse first), so no value of an earlier call survives. The conventions are
    absl_flags_parser's: --help/-h prints `doc` and every flag with its help, exit 0; an unknown
    flag, a bad value, a missing required flag or a stray positional argument is one line
    `error: <what> (python PROG --help)`, exit 2. Returns `flag_values`, read as `args.name`.
    """
    import sys

    from absl import flags

    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[:argv.index("--")] if "--" in argv else argv
    if any(a in _HELP_FLAGS for a in options):
        listing = flag_values.get_help(prefix="", include_special_flags=False)
        # get_help groups the flags under their defining module's name, which here is only the
        # name the script happened to be loaded under: keep the flag lines.
        listing = "\n".join(ln for ln in listing.splitlines() if ln.startswith(" "))
        print(f"{doc.strip()}\n\nflags:\n{listing}" if doc else f"flags:\n{listing}")
        sys.exit(0)
    flag_values.unparse_flags()
    try:
        rest = flag_values([prog, *argv])
    except flags.Error as e:
        message = str(e).splitlines()[0]
        missing = re.match(r"flag (--\w+)=None: Flag --\w+ must have a value other than None", message)
        usage_error(f"{missing.group(1)} is required" if missing else message, [prog])
    if len(rest) > 1:
        usage_error(f"unexpected arguments: {' '.join(rest[1:])}", [prog])
    return flag_values

