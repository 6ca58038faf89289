"""`Predictor`: how will the public respond to THIS news, per user and as a crowd.

The same code as training and evaluation, end to end: the prompt is the prompt builder's
(`data.prompt.build_examples(..., include_response=False)`: BM25 history against the new news,
the span boundaries user_end/news_end that PAC-LoRA routes by), posts come from the KV-cache
sampler (`generation`'s jitted prefill + `while_loop`) and the sentiment probabilities are the
head's, read off that same prefill at the last prompt token, exactly as `launch/generate.py`
does for a test split. Under several wordings a user's history is chosen (against all of
them) and cut once, so each user's prompts are the same up to the news and the wordings'
crowds differ by the wording alone.

Speed: every (wording, user) prompt is prefilled once and its K samples branch from that
prefill (`generation.sample_rows`); with causal (token) routing a user's wordings also prefill
their common head, the whole user span, once. Prompts are sorted by length and cut into batches of about
`batch_size` prompts (each prompt's K samples decode as K rows sharing its cache) whose shape is
bucketed (users: a power of two up to batch_size // wordings; lengths: a multiple of 32), so a
prediction compiles at most a
few shapes and a long-lived process (the web server, a notebook) compiles each shape once:
the jitted sampler takes params and adapters as arguments and keeps the sampling settings
fixed (the request's seed only changes the PRNG key, never a static argument). One prediction
runs at a time per Predictor (a lock), so two requests never race to compile.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from socialalign_jax.core.errors import UserError
from socialalign_jax.data import tfds_builders as B
from socialalign_jax.data.labellers import LexiconLabeller
from socialalign_jax.data.prompt import PromptConfig, PromptTooLong, build_examples
from socialalign_jax.data.records import DEFAULT_LABELS, DataError, Event
from socialalign_jax.evaluation import skill as skill_lib
from socialalign_jax.inference import export, generation
from socialalign_jax.model.sampling import PAPER_MAX_NEW_TOKENS, SamplingConfig
from socialalign_jax.predict import crowd as crowd_lib
from socialalign_jax.predict.users import User, as_users, prompt_case
from socialalign_jax.runs.restore import SKILL_FILE, restore_run
from socialalign_jax.runs.run_config import SampleSection
from socialalign_jax.weights import adapters as adapters_lib
from socialalign_jax.weights.resolve import resolve_weights
from socialalign_jax.weights.tokenizer import load_tokenizer

DEFAULT_MAX_USERS = 10_000


class PredictError(UserError, ValueError):
    """Bad input to a prediction (news, topic, users, settings): one line naming what is wrong."""


# ----------------------------------------------------------------------------- results


def _dist(labels: Sequence[str], values) -> dict[str, float]:
    return {name: float(v) for name, v in zip(labels, values)}


def _interval(labels: Sequence[str], values) -> dict[str, tuple[float, float]]:
    return {name: (float(v[0]), float(v[1])) for name, v in zip(labels, values)}


@dataclasses.dataclass(frozen=True)
class UserResult:
    """One user under one wording: K sampled posts and the head's sentiment {label: p}."""

    user_name: str
    posts: tuple[str, ...]
    sentiment: dict[str, float]
    post_labels: tuple[str, ...] | None = None  # the labeller's label of each post, when one was chosen
    prompt_tokens: int = 0
    # History characters the prompt budget cut (the same under every wording: a user's history is cut
    # once, to fit the longest wording; `data.prompt.build_examples`).
    history_chars_cut: int = 0


@dataclasses.dataclass(frozen=True)
class CrowdResult:
    """The crowd under one wording: mean head distribution with its bootstrap interval."""

    news: str
    topic: str
    distribution: dict[str, float]
    interval: dict[str, tuple[float, float]]
    users: tuple[UserResult, ...]
    generated_distribution: dict[str, float] | None = None  # labeller's classes of the generated posts
    generated_interval: dict[str, tuple[float, float]] | None = None
    # The head's mean before the shrink toward the average mix (None when nothing was shrunk).
    raw_distribution: dict[str, float] | None = None


# Below this many users a framing comparison names no wording: the percentile bootstrap over users
# covers far less than its level for small crowds (with 4 users there are only 35 distinct resamples),
# so an interval that happens to exclude 0 is no evidence (docs/prediction.md, "Framing comparison").
MIN_USERS_FOR_VERDICT = 30
MAX_SEED = 2**31 - 1  # the sampler's PRNG key takes 32 bits: larger seeds would alias smaller ones


@dataclasses.dataclass(frozen=True)
class Difference:
    """Wording a minus wording b (head distributions), with a paired bootstrap interval over the same
    `num_users` users; `reading` and `verdict` say what it shows, and that it rests on those users."""

    a: int
    b: int
    difference: dict[str, float]
    interval: dict[str, tuple[float, float]]
    generated_difference: dict[str, float] | None = None
    generated_interval: dict[str, tuple[float, float]] | None = None
    num_users: int = 0
    level: float = crowd_lib.DEFAULT_LEVEL

    @property
    def underpowered(self) -> bool:
        return self.num_users < MIN_USERS_FOR_VERDICT

    def reading(self, label: str) -> str:
        """One label's difference in words: which way, if its interval excludes 0 and the crowd is large enough."""
        lo, hi = self.interval[label]
        if self.underpowered:
            return f"underpowered ({self.num_users} users)"
        if lo > 0:
            return f"more under wording {self.a + 1} (interval excludes 0)"
        if hi < 0:
            return f"fewer under wording {self.a + 1} (interval excludes 0)"
        return "no clear difference (interval includes 0)"

    @property
    def verdict(self) -> str:
        """The comparison in one sentence: the users it rests on, and a wording named only when the crowd is
        large enough and some label's interval excludes 0."""
        pct = int(round(self.level * 100))
        a, b = f"wording {self.a + 1}", f"wording {self.b + 1}"
        if self.underpowered:
            return (f"underpowered: {self.num_users} users, fewer than the {MIN_USERS_FOR_VERDICT} a framing "
                    f"comparison needs; no wording is named (predict for at least {MIN_USERS_FOR_VERDICT} users)")
        clear = [(k, d, self.interval[k]) for k, d in self.difference.items()
                 if self.interval[k][0] > 0 or self.interval[k][1] < 0]
        if not clear:
            return f"no clear difference on {self.num_users} users: every label's {pct}% interval includes 0"
        parts = [f"{'more' if lo > 0 else 'fewer'} {k} ({d:+.3f}, {pct}% interval [{lo:.3f}, {hi:.3f}] excludes 0)"
                 for k, d, (lo, hi) in clear]
        return f"on {self.num_users} users, {a} draws " + "; ".join(parts) + f" than {b}"


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Everything one `Predictor.predict` call found; `to_json()` is crowd.json."""

    labels: tuple[str, ...]
    num_users: int
    samples: int
    seed: int
    level: float
    num_resamples: int
    labeller: str | None
    run: dict[str, Any]
    variants: tuple[CrowdResult, ...]
    differences: tuple[Difference, ...] = ()
    topic_given: bool = True  # False: derived from the first wording (default_topic), for every wording
    # The run's track record on its held-out events (evaluation/skill.py) plus 'sentence' and the
    # shrink weight 'w' applied to the crowd's distribution (1 = the head's mean as it is).
    skill: dict[str, Any] | None = None

    @property
    def random_weights(self) -> bool:
        return uses_random_weights(self.run)

    @property
    def skill_sentence(self) -> str:
        return skill_lib.skill_sentence(self.skill)

    # The first wording is "the" prediction; the others are framing variants of it.
    @property
    def crowd(self) -> CrowdResult:
        return self.variants[0]

    @property
    def distribution(self) -> dict[str, float]:
        return self.variants[0].distribution

    @property
    def interval(self) -> dict[str, tuple[float, float]]:
        return self.variants[0].interval

    @property
    def users(self) -> tuple[UserResult, ...]:
        return self.variants[0].users

    def to_json(self) -> dict[str, Any]:
        """crowd.json: the first wording's crowd at the top level, every wording under 'variants'."""
        def crowd_json(c: CrowdResult) -> dict:
            d = {"news": c.news, "topic": c.topic, "distribution": c.distribution,
                 "interval": {k: list(v) for k, v in c.interval.items()}}
            if c.raw_distribution is not None:
                d["raw_distribution"] = c.raw_distribution
            if c.generated_distribution is not None:
                d["generated"] = {"distribution": c.generated_distribution,
                                  "interval": {k: list(v) for k, v in c.generated_interval.items()}}
            return d

        first = crowd_json(self.crowd)
        out: dict[str, Any] = {"labels": list(self.labels), "num_users": self.num_users, **first,
                               "topic_source": "given" if self.topic_given else "derived from wording 1",
                               "random_weights": self.random_weights,
                               "samples": self.samples, "seed": self.seed,
                               "bootstrap": {"method": "percentile", "over": "users", "level": self.level,
                                             "resamples": self.num_resamples, "paired_across_variants": True},
                               "labeller": self.labeller, "run": self.run,
                               "forecast_skill": {**(self.skill or {}), "sentence": self.skill_sentence},
                               "variants": [crowd_json(c) for c in self.variants], "differences": []}
        for d in self.differences:
            row = {"a": d.a, "b": d.b, "news_a": self.variants[d.a].news, "news_b": self.variants[d.b].news,
                   "difference": d.difference, "interval": {k: list(v) for k, v in d.interval.items()},
                   "num_users": d.num_users, "reading": {k: d.reading(k) for k in self.labels},
                   "verdict": d.verdict}
            if d.generated_difference is not None:
                row["generated"] = {"difference": d.generated_difference,
                                    "interval": {k: list(v) for k, v in d.generated_interval.items()}}
            out["differences"].append(row)
        return out

    def records(self) -> Iterable[dict[str, Any]]:
        """predictions.jsonl: one line per wording, user and sample."""
        for v, c in enumerate(self.variants):
            for u in c.users:
                for k, post in enumerate(u.posts):
                    rec = {"variant": v, "user_name": u.user_name, "sample": k, "post": post,
                           "sentiment": u.sentiment, "prompt_tokens": u.prompt_tokens,
                           "history_chars_cut": u.history_chars_cut}
                    if u.post_labels is not None:
                        rec["post_label"] = u.post_labels[k]
                    yield rec


# ----------------------------------------------------------------------------- helpers


def uses_random_weights(run: Mapping[str, Any]) -> bool:
    """The base model of this run description is random (`random:<preset>`): its posts are not text and its
    head read no language, so nothing it predicts is about real users."""
    return str(run.get("weights", "")).startswith("random:")


def default_topic(news: str) -> str:
    """The hashtag when none is given: the news's own #hashtag# if it has one, else its first clause.

    The template needs a topic (the post is "about hashtag #topic#"); Weibo hashtags are short
    phrases, so the first clause, at most 20 characters, stands in for one.
    """
    m = re.search(r"#([^#\n]{1,40})#", news)
    if m and m.group(1).strip():
        return m.group(1).strip()
    first = re.split(r"[，。！？；：,.!?;:\n]", news.strip(), maxsplit=1)[0].strip()
    return (first or news.strip())[:20]


def _check_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise PredictError(f"{field}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise PredictError(f"{field}: empty" + ("" if field == "topic" else "; give the news text to predict the response to"))
    return value


def check_settings(*, samples: int = 1, seed: int = 0, level: float = crowd_lib.DEFAULT_LEVEL,
                   num_resamples: int = crowd_lib.DEFAULT_RESAMPLES, prefix: str = "") -> None:
    """The numeric settings of a prediction, checked before any model work (the CLI checks them before it
    loads the model); `prefix` is how the caller names them ('--' for flags)."""
    def whole(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not whole(samples) or samples < 1:
        raise PredictError(f"{prefix}samples: must be an integer >= 1, got {samples!r}")
    if not whole(seed) or not 0 <= seed <= MAX_SEED:
        raise PredictError(f"{prefix}seed: must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise PredictError(f"{prefix}level: must be between 0 and 1 (e.g. 0.9 for 90% intervals), got {level!r}")
    if not whole(num_resamples) or num_resamples < 1:
        raise PredictError(f"{prefix}{'resamples' if prefix else 'num_resamples'}: must be an integer >= 1, "
                           f"got {num_resamples!r}")


def resolve_labeller(labeller: Any, labels: Sequence[str]):
    """None | 'none' | 'lexicon' | a Labeller object -> (labeller or None, its name)."""
    if labeller is None or labeller == "none":
        return None, None
    if labeller == "lexicon":
        labeller = LexiconLabeller()
    elif isinstance(labeller, str):
        raise PredictError(f"labeller: {labeller!r} is not 'lexicon' or 'none' (or pass a Labeller object; "
                           "'zeroshot' needs weights: evaluation.model_labeller.zero_shot_labeller(SPEC))")
    have = tuple(getattr(labeller, "labels", ()))
    if set(have) != set(labels):
        raise PredictError(f"labeller: its classes {list(have)} differ from the model's {list(labels)}")
    return labeller, str(getattr(labeller, "name", type(labeller).__name__))


# ----------------------------------------------------------------------------- the predictor


class Predictor:
    """A base model + trained adapters and head, ready to predict crowds.

    Build one with `Predictor.from_run(run_dir)` (a training run: its saved config, base
    weights and latest checkpoint) or `Predictor.from_adapters(path, weights=SPEC)` (an export).
    """

    def __init__(self, params, adapters, model_cfg, lora_cfg, tokenizer, *, labels: Sequence[str] = DEFAULT_LABELS,
                 prompt: PromptConfig = PromptConfig(on_overflow="raise"), sampling: SamplingConfig | None = None,
                 batch_size: int = SampleSection.batch_size, max_users: int = DEFAULT_MAX_USERS,
                 run: Mapping[str, Any] | None = None,
                 skill: Mapping[str, Any] | None = None):
        if adapters is None or "head" not in adapters:
            raise PredictError("these adapters have no sentiment head (lora.num_classes = 0): the crowd's "
                               "distribution is read off the head; train with lora.num_classes > 0")
        k = int(np.shape(adapters["head"]["kernel"])[-1])
        if len(labels) != k:
            raise PredictError(f"labels: {len(labels)} names {list(labels)} for a head with {k} classes")
        if batch_size < 1 or max_users < 1:
            raise PredictError(f"batch_size and max_users must be >= 1, got {batch_size} and {max_users}")
        self.params, self.adapters = params, adapters
        self.model_cfg, self.lora_cfg, self.tokenizer = model_cfg, lora_cfg, tokenizer
        self.labels = tuple(labels)
        # Prediction never skips a user silently: a prompt that cannot fit is an error.
        self.prompt_cfg = dataclasses.replace(prompt, on_overflow="raise")
        if sampling is None:  # no run config to take it from: the paper's generation length
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            sampling = SamplingConfig(max_new_tokens=PAPER_MAX_NEW_TOKENS,
                                      stop_tokens=generation.stop_tokens_for(tokenizer), pad_id=int(pad))
        self.sampling = sampling
        self.batch_size = int(batch_size)
        self.max_users = int(max_users)
        self.run = dict(run or {})
        self.skill = _checked_skill(skill, self.labels)
        self.random_weights = uses_random_weights(self.run)
        # (prompts, samples, shared prefix length, prompt length) of the sampler calls so far: the shapes compiled
        self.compiled_shapes: set[tuple[int, int, int, int]] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, step: int | None = None, *, dtype: str | None = None,
                 **kw) -> "Predictor":
        """A training run directory: its saved config.json (nothing to repeat), base weights, latest checkpoint.

        dtype: compute in this dtype instead of the run's (`runs.restore.restore_run`), e.g. 'bfloat16'."""

        run_dir = os.fspath(run_dir)
        run = restore_run(run_dir, step, dtype=dtype)
        cfg = run.cfg
        labels, num_history, pad_id = cfg.data.labels, cfg.data.num_history, None
        meta = _run_dataset_metadata(cfg, run_dir)
        if meta:
            labels = tuple(meta.get("classes") or labels)
            num_history = int(meta.get("config", {}).get("num_history", num_history))
            pad_id = meta.get("config", {}).get("pad_id")
        if pad_id is None:
            pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
        prompt = PromptConfig(mode=cfg.data.mode, max_length=cfg.data.max_length, on_overflow="raise",
                              num_history=num_history)
        sampling = generation.sampling_config(cfg, run.tokenizer, int(pad_id))
        kw.setdefault("batch_size", cfg.sample.batch_size)
        info = {"workdir": os.path.abspath(run_dir), "step": run.step, "weights": str(cfg.model.weights),
                "dtype": run.model_cfg.dtype}
        kw.setdefault("skill", read_skill(run_dir))
        return cls(run.params, run.adapters, run.model_cfg, run.lora_cfg, run.tokenizer, labels=labels,
                   prompt=prompt, sampling=sampling, run=info, **kw)

    @classmethod
    def from_adapters(cls, adapters: str | os.PathLike, weights: str, *, tokenizer: str | None = None,
                      labels: Sequence[str] = DEFAULT_LABELS, mode: str | None = None, max_length: int | None = None,
                      num_history: int | None = None, sampling: SamplingConfig | None = None, dtype: str | None = None,
                      **kw) -> "Predictor":
        """Exported adapters on the base model `weights` names (any layout `adapters.load_adapters` reads,
        or an `launch/export.py --format orbax` directory); the prompt settings are the training run's
        (mode, max_length, num_history: None takes PromptConfig's default, max_length the paper's 1024)."""

        w = resolve_weights(weights, dtype=dtype)
        tok = w.tokenizer
        if tokenizer:
            tok = load_tokenizer(tokenizer)
        if tok is None:
            raise PredictError(f"weights {weights!r} come without a tokenizer: pass tokenizer=DIR")
        path = os.fspath(adapters)
        if export.is_orbax_export(path):
            tree, lc = export.load_orbax_adapters(path)
        else:
            tree, lc = adapters_lib.load_adapters(path, w.cfg)
        given = {"mode": mode, "max_length": max_length, "num_history": num_history}
        prompt = PromptConfig(**{k: v for k, v in given.items() if v is not None}, on_overflow="raise")
        info = {"adapters": os.path.abspath(path), "weights": weights, "dtype": w.cfg.dtype}
        kw.setdefault("skill", read_skill(path if os.path.isdir(path) else os.path.dirname(path)))
        return cls(jax.device_put(w.params), jax.device_put(tree), w.cfg, lc, tok, labels=labels, prompt=prompt,
                   sampling=sampling, run=info, **kw)

    # ------------------------------------------------------------------ prompts

    def check_request(self, news: Sequence[str], users: Sequence[User], samples: int) -> None:
        """The cheap checks, before any model work: wordings, crowd size, samples."""
        for i, text in enumerate(news):
            _check_text(text, "news" if i == 0 else f"variants[{i - 1}]")
        if not users:
            raise PredictError("users: the crowd is empty; give at least one user")
        if len(users) > self.max_users:
            raise PredictError(f"users: {len(users)} users, more than this predictor's limit of {self.max_users} "
                               "(split the crowd, or raise max_users / --max_users)")
        check_settings(samples=samples)

    def build_prompts(self, wordings: Sequence[str], topic: str, users: Sequence[User]) -> list[list[dict]]:
        """Prompt-only examples [V][U] (token ids, prompt_len, user_end, news_end), wording v of user u.

        A user's W prompts share one user span (`data.prompt.build_examples`: history chosen by BM25
        against all the wordings and cut once to fit the longest), so the wordings' crowds differ by
        the wording alone and a user's prompts are prefilled together up to the news.
        """
        events = [Event(event_id="predict", topic=topic, news=w, source="news" if v == 0 else f"variants[{v - 1}]")
                  for v, w in enumerate(wordings)]
        out: list[list[dict]] = [[] for _ in events]
        limit = int(self.model_cfg.max_position_embeddings)
        for u in users:
            case = prompt_case(u)
            for event in events:
                event.cases = [case]
            try:
                exs = build_examples(case, events, self.tokenizer, self.prompt_cfg, include_response=False)
            except PromptTooLong as e:
                raise PredictError(f"{e.file} for user {u.user_name!r}: the prompt does not fit: {e.what}; "
                                   f"shorten the news (the run's prompts hold at most {self.prompt_cfg.max_length} "
                                   "tokens)") from None
            except DataError as e:
                raise PredictError(f"{e.file} for user {u.user_name!r}: {e.what}") from None
            for event, ex, column in zip(events, exs, out):
                n = int(ex["prompt_len"])
                if n + self.sampling.max_new_tokens > limit:
                    raise PredictError(f"{event.source} for user {u.user_name!r}: {n} prompt + "
                                       f"{self.sampling.max_new_tokens} new tokens exceed the model's "
                                       f"{limit} positions; shorten the news")
                column.append(ex)
        return out

    # ------------------------------------------------------------------ predicting

    def predict(self, news: str, users: Sequence[User | Mapping[str, Any]], *, topic: str | None = None,
                samples: int = 1, seed: int = 0, variants: Sequence[str] = (), labeller: Any = None,
                level: float = crowd_lib.DEFAULT_LEVEL, num_resamples: int = crowd_lib.DEFAULT_RESAMPLES,
                progress: bool = False) -> Prediction:
        """Predict the crowd's response to `news` (and to each wording in `variants`, on the same users).

        users: `User`s or dicts in the USERS.jsonl schema. samples: posts per user (K). seed:
        the sampling PRNG and the bootstrap. labeller: None, 'lexicon' or a Labeller, to also
        report the distribution of the generated posts' labels. Returns frozen dataclasses.
        """
        users = as_users(users)
        wordings = [news, *variants]
        self.check_request(wordings, users, samples)
        check_settings(samples=samples, seed=seed, level=level, num_resamples=num_resamples)
        if topic is not None:
            _check_text(topic, "topic")
        # One hashtag for every wording: a framing comparison changes the wording and nothing else.
        topics = [topic.strip() if topic is not None else default_topic(news)] * len(wordings)
        labeller, labeller_name = resolve_labeller(labeller, self.labels)
        examples = self.build_prompts(wordings, topics[0], users)
        with self._lock:  # one prediction at a time: no two compilations racing, no interleaved batches
            posts, probs = self._generate(examples, samples, seed, progress)
        # probs [V, U, C]; posts [V][U][K]
        v_n, u_n = len(wordings), len(users)
        post_labels = None
        gen_user = None
        if labeller is not None:
            flat = [p for pv in posts for pu in pv for p in pu]
            names = list(labeller.label(flat))
            post_labels = np.asarray(names, object).reshape(v_n, u_n, samples)
            onehot = np.stack([(post_labels == name) for name in self.labels], axis=-1).astype(np.float64)
            gen_user = onehot.mean(axis=2)  # [V, U, C]: fraction of each user's posts per class
        idx = crowd_lib.resample_indices(u_n, seed, num_resamples)
        head = crowd_lib.summarise(probs, idx, level)
        gen = crowd_lib.summarise(gen_user, idx, level) if gen_user is not None else None
        # The crowd's forecast leans toward the average mix by the run's measured weight w (1 - w of
        # the way): the mean, its interval and every wording's difference are the same linear map
        # of the users' head probabilities (each user's own probabilities are kept as they are).
        w = float(self.skill["w"]) if self.skill else 1.0
        prior = np.asarray(self.skill["prior"], np.float64) if self.skill and w < 1.0 else None
        raw_mean = head.mean
        if prior is not None:
            head = head._replace(
                mean=skill_lib.shrink(head.mean, prior, w),
                interval=skill_lib.shrink(head.interval, prior[None, :, None], w),
                diff=w * head.diff, diff_interval=w * head.diff_interval)

        crowds = []
        for v in range(v_n):
            results = tuple(UserResult(
                user_name=users[u].user_name, posts=tuple(posts[v][u]), sentiment=_dist(self.labels, probs[v, u]),
                post_labels=None if post_labels is None else tuple(post_labels[v, u]),
                prompt_tokens=int(examples[v][u]["prompt_len"]),
                history_chars_cut=int(examples[v][u]["n_truncated_history_chars"])) for u in range(u_n))
            crowds.append(CrowdResult(
                news=wordings[v], topic=topics[v], distribution=_dist(self.labels, head.mean[v]),
                interval=_interval(self.labels, head.interval[v]), users=results,
                raw_distribution=None if prior is None else _dist(self.labels, raw_mean[v]),
                generated_distribution=None if gen is None else _dist(self.labels, gen.mean[v]),
                generated_interval=None if gen is None else _interval(self.labels, gen.interval[v])))
        diffs = tuple(Difference(
            a=i, b=j, difference=_dist(self.labels, head.diff[p]), interval=_interval(self.labels, head.diff_interval[p]),
            generated_difference=None if gen is None else _dist(self.labels, gen.diff[p]),
            generated_interval=None if gen is None else _interval(self.labels, gen.diff_interval[p]),
            num_users=u_n, level=float(level))
            for p, (i, j) in enumerate(head.pairs))
        return Prediction(labels=self.labels, num_users=u_n, samples=samples, seed=int(seed), level=float(level),
                          num_resamples=int(num_resamples), labeller=labeller_name, run=dict(self.run),
                          variants=tuple(crowds), differences=diffs, topic_given=topic is not None,
                          skill=None if self.skill is None else {**self.skill, "w_applied": w})

    def _generate(self, examples: list[list[dict]], samples: int, seed: int, progress: bool):
        """Sample every (wording, user) prompt's K posts with `generation.sample_rows`.

        Each prompt is prefilled once and its K samples branch from that prefill; the head's
        probabilities come from it. A user's V prompts are one group, so with causal routing the
        head they have in common (up to where the wordings' prompts first differ, at most the user
        span) is prefilled once for all V. Prompt (v, u) has row id v*U + u, so sample k of user u
        under wording v draws from fold_in(fold_in(PRNGKey(seed), v*U + u), k) however it is batched.
        Returns posts [V][U][K] (str) and head probabilities [V, U, C] (float64).
        """
        v_n, u_n = len(examples), len(examples[0])
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=v_n * u_n * samples, desc="predict", unit="post", dynamic_ncols=True)
        try:  # rows user-major (u, v): a user's wordings are consecutive, one group
            out = generation.sample_rows(
                self.params, self.adapters, self.model_cfg, self.lora_cfg, self.sampling,
                [examples[v][u] for u in range(u_n) for v in range(v_n)], samples=samples, seed=seed,
                row_ids=[v * u_n + u for u in range(u_n) for v in range(v_n)], batch_size=self.batch_size,
                tokenizer=self.tokenizer, group_size=v_n, on_batch=None if bar is None else bar.update)
        finally:
            if bar is not None:
                bar.close()
        self.compiled_shapes.update(out.shapes)
        posts = [[out.texts[u * v_n + v] for u in range(u_n)] for v in range(v_n)]
        probs = np.asarray(out.probs, np.float64).reshape(u_n, v_n, -1).transpose(1, 0, 2)
        return posts, probs


def read_skill(directory: str) -> dict[str, Any] | None:
    """A run's (or an export's) forecast_skill.json, or None when it has none (an older run)."""
    import json

    path = os.path.join(directory, SKILL_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PredictError(f"{path}: unreadable ({e}); delete it to predict without a track record") from None
    if not isinstance(rec, dict) or "status" not in rec:
        raise PredictError(f"{path}: not a forecast track record (no 'status'); delete it to predict without one")
    return rec


def _checked_skill(rec: Mapping[str, Any] | None, labels: Sequence[str]) -> dict[str, Any] | None:
    """The record, with w and the prior checked against the head's classes (a w without a usable prior is 1)."""
    if rec is None:
        return None
    rec = dict(rec)
    try:
        w = float(rec.get("w", 1.0))
    except (TypeError, ValueError):
        raise PredictError(f"forecast track record: 'w' {rec.get('w')!r} is not a number") from None
    if not 0.0 <= w <= 1.0:
        raise PredictError(f"forecast track record: 'w' {w} is not in [0, 1]")
    prior = rec.get("prior")
    if w < 1.0 and (not isinstance(prior, list) or len(prior) != len(labels)):
        raise PredictError(f"forecast track record: 'prior' must list {len(labels)} shares, one per class "
                           f"({', '.join(labels)})")
    if rec.get("labels") is not None and list(rec["labels"]) != list(labels):
        raise PredictError(f"forecast track record: its classes {rec['labels']} are not the head's {list(labels)}")
    rec["w"] = w
    return rec


def _run_dataset_metadata(cfg, run_dir: str) -> dict | None:
    """The run's built dataset's metadata (class names, num_history, pad id), when it is still there."""
    import json

    data_dir = cfg.data.data_dir or os.path.join(run_dir, "data")
    try:
        d = B.find_dataset_dir(data_dir)
        return json.loads((d / "metadata.json").read_text(encoding="utf-8"))
    except (DataError, OSError, ValueError):
        return None


__all__ = ["Predictor", "Prediction", "CrowdResult", "UserResult", "Difference", "PredictError", "default_topic",
           "read_skill", "resolve_labeller", "check_settings", "DEFAULT_MAX_USERS", "MIN_USERS_FOR_VERDICT"]
