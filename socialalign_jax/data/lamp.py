"""LaMP-4 / -5 / -7 (Salemi et al., 2023): readers, profile retrieval and the prompt.

LaMP has no events and no sentiment: each question is one user (the profile) facing one
input. Mapped onto SocialAlign's spans, the user span is the retrieved profile items and
the news span is the input, so PAC-LoRA's analyze gate reads the input and its compose
gate reads the profile exactly as on Weibo. Every question is its own "event" (label -1),
so train LaMP with cases_per_event = 1.

Files (the published format):
  questions: [{"id": str, "input": str, "profile": [{...}, ...]}, ...]
  outputs:   {"task": "LaMP_4", "golds": [{"id": str, "output": str}, ...]}   (optional)

Profile item fields per task, and how an item is shown in the prompt (the rendering the
LaMP paper uses for its retrieval-augmented prompts):
  LaMP-4 {"title", "text"}:     "{title}" is the title for "{text}"
  LaMP-5 {"title", "abstract"}: "{title}" is the title for "{abstract}"
  LaMP-7 {"text"}:              "{text}"
Retrieval: BM25 (SPEC section 4) over the rendered items, the query being the input
without its fixed task instruction.

The template (ChatML, English):
  <|im_start|>system\\nYou are writing as one particular user. Match their style.<|im_end|>\\n
  <|im_start|>user\\nHere are some past writings of this user:\\n1. {item}\\n2. {item}...\\n
  Now do this task for the user: {input}<|im_end|>\\n<|im_start|>assistant\\n{output}<|im_end|>
user_end = the first token of "Now do this task"; news_end = the first token after the
input (the user turn's <|im_end|>). When the prompt is too long, the lowest-ranked profile
items are dropped one by one (counted in n_truncated_history_chars); if it is still too
long without any, on_overflow decides (skip or raise).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from socialalign_jax.data.bm25 import bm25_scores
from socialalign_jax.data.prompt import PromptTooLong, overflow
from socialalign_jax.data.records import DataError, load_json
from socialalign_jax.weights.tokenizer import IM_END, IM_START

TASKS = {
    "LaMP-4": ("title", "text"),
    "LaMP-5": ("title", "abstract"),
    "LaMP-7": ("text",),
}

# The fixed instruction each LaMP input starts with (stripped from the BM25 query).
INPUT_PREFIXES = {
    "LaMP-4": "Generate a headline for the following article: ",
    "LaMP-5": "Generate a title for the following abstract of a paper: ",
    "LaMP-7": "Paraphrase the following tweet without any explanation before or after it: ",
}

SYSTEM = "You are writing as one particular user. Match their style."
PROFILE_HEADER = "Here are some past writings of this user:\n"
TASK_MARKER = "Now do this task for the user: "


@dataclasses.dataclass(frozen=True)
class LampQuestion:
    id: str
    input: str
    profile: tuple[dict, ...]
    output: str | None  # None when no outputs file was given
    index: int  # position in the questions file (for error messages and case index)
    source: str = ""  # the questions file


def normalize_task(task: str) -> str:
    """'LaMP_4', 'lamp-4', '4' -> 'LaMP-4'."""
    t = str(task).strip().lower().replace("_", "-").removeprefix("lamp-")
    name = f"LaMP-{t}"
    if name not in TASKS:
        raise ValueError(f"unsupported LaMP task {task!r}; expected one of {sorted(TASKS)}")
    return name


def _str(path, rec, obj, key, *, allow_int=False) -> str:
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", rec)
    if key not in obj or obj[key] is None:
        raise DataError(path, "missing", rec, key)
    v = obj[key]
    if allow_int and isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise DataError(path, f"expected a string, got {type(v).__name__}", rec, key)
    return v


def read_outputs(path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """Outputs file -> (task, {id: output}); duplicate ids are an error."""
    path = Path(path)
    blob = load_json(path)
    if not isinstance(blob, dict):
        raise DataError(path, f"expected a JSON object {{task, golds}}, got {type(blob).__name__}")
    task = _str(path, None, blob, "task")
    golds = blob.get("golds")
    if not isinstance(golds, list):
        raise DataError(path, "missing or not a list", None, "golds")
    out: dict[str, str] = {}
    for i, g in enumerate(golds):
        gid = _str(path, i, g, "id", allow_int=True)
        if gid in out:
            raise DataError(path, f"duplicate id {gid!r}", i, "id")
        out[gid] = _str(path, i, g, "output")
    return task, out


def read_questions(path: str | os.PathLike, task: str) -> list[LampQuestion]:
    """Questions file -> questions with validated profile items (fields per task)."""
    path, task = Path(path), normalize_task(task)
    blob = load_json(path)
    if not isinstance(blob, list):
        raise DataError(path, f"expected a JSON list of questions, got {type(blob).__name__}")
    need = TASKS[task]
    out, seen = [], set()
    for i, q in enumerate(blob):
        qid = _str(path, i, q, "id", allow_int=True)
        if qid in seen:
            raise DataError(path, f"duplicate id {qid!r}", i, "id")
        seen.add(qid)
        text = _str(path, i, q, "input")
        if not text.strip():
            raise DataError(path, "empty string", i, "input")
        prof = q.get("profile")
        if not isinstance(prof, list):
            raise DataError(path, "missing or not a list", i, "profile")
        items = []
        for j, item in enumerate(prof):
            if not isinstance(item, dict):
                raise DataError(path, f"expected a JSON object, got {type(item).__name__}", i, f"profile[{j}]")
            for k in need:
                v = item.get(k)
                if not isinstance(v, str):
                    what = "missing" if v is None else f"expected a string, got {type(v).__name__}"
                    raise DataError(path, what, i, f"profile[{j}].{k}")
            items.append(dict(item))
        out.append(LampQuestion(id=qid, input=text, profile=tuple(items), output=None, index=i, source=str(path)))
    return out


def read_lamp(questions: str | os.PathLike, outputs: str | os.PathLike | None = None,
              task: str | None = None) -> tuple[str, list[LampQuestion]]:
    """Join a questions file with its outputs file (when given) -> (task, questions).

    The task comes from `task` or the outputs file; when both are given they must agree.
    With outputs, every question must have exactly one gold and every gold a question.
    """
    golds: dict[str, str] | None = None
    if outputs is not None:
        out_task, golds = read_outputs(outputs)
        out_task = normalize_task(out_task)
        if task is not None and normalize_task(task) != out_task:
            raise DataError(outputs, f"task {out_task} does not match the requested {normalize_task(task)}",
                            None, "task")
        task = out_task
    if task is None:
        raise DataError(questions, "cannot tell the LaMP task: give --lamp_task or an outputs file")
    task = normalize_task(task)
    qs = read_questions(questions, task)
    if golds is not None:
        ids = {q.id for q in qs}
        for q in qs:
            if q.id not in golds:
                raise DataError(outputs, f"no gold output for question id {q.id!r} "
                                f"(record {q.index} of {questions})", None, "golds")
        extra = sorted(set(golds) - ids)
        if extra:
            raise DataError(outputs, f"{len(extra)} gold ids have no question, e.g. {extra[0]!r}", None, "golds")
        qs = [dataclasses.replace(q, output=golds[q.id]) for q in qs]
    return task, qs


def render_item(item: dict, task: str) -> str:
    """A profile item as shown to the model (and indexed by BM25)."""
    task = normalize_task(task)
    if task == "LaMP-4":
        return f'"{item["title"]}" is the title for "{item["text"]}"'
    if task == "LaMP-5":
        return f'"{item["title"]}" is the title for "{item["abstract"]}"'
    return f'"{item["text"]}"'


def retrieval_query(text: str, task: str) -> str:
    """The input without LaMP's fixed task instruction, which would only add noise to BM25."""
    prefix = INPUT_PREFIXES[normalize_task(task)]
    return text[len(prefix):] if text.startswith(prefix) else text


def select_profile(q: LampQuestion, task: str, k: int) -> list[str]:
    """Top-k rendered profile items by BM25 against the input, best first (ties: file order)."""

    rendered = [render_item(it, task) for it in q.profile]
    if not rendered or k <= 0:
        return []
    scores = bm25_scores(rendered, retrieval_query(q.input, task))
    order = sorted(range(len(rendered)), key=lambda i: (-scores[i], i))
    return [rendered[i] for i in order[:k]]


def prompt_parts(profile: Sequence[str], question_input: str) -> tuple[str, str, str]:
    """(text before the user marker, news span text, the rest) of the rendered prompt."""

    lines = "".join(f"{i + 1}. {p}\n" for i, p in enumerate(profile))
    user = f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{PROFILE_HEADER}{lines}"
    news = f"{TASK_MARKER}{question_input}"
    rest = f"{IM_END}\n{IM_START}assistant\n"
    return user, news, rest


def build_lamp_example(q: LampQuestion, task: str, tokenizer, cfg, stats=None) -> dict | None:
    """Token ids, loss mask and spans of one question (the fields of prompt.build_example).

    `cfg` is a prompt.PromptConfig: num_history = profile items shown, mode
    'without_history' shows none ('without_persona' = 'full': LaMP has no persona).
    A question without a gold output gives a prompt-only example (loss_mask all 0).
    """

    profile = [] if cfg.mode == "without_history" else select_profile(q, task, cfg.num_history)
    resp = [] if q.output is None else tokenizer(q.output + IM_END, add_special_tokens=False)["input_ids"]
    budget = cfg.max_length - len(resp)
    for keep in range(len(profile), -1, -1):  # drop the lowest-ranked items until it fits
        user, news, rest = prompt_parts(profile[:keep], q.input)
        enc = tokenizer(user + news + rest, add_special_tokens=False)
        if len(enc["input_ids"]) <= budget:
            break
    else:
        err = PromptTooLong(q.source, f"{len(enc['input_ids'])} prompt + {len(resp)} response tokens exceed "
                            f"max_length {cfg.max_length} even without profile items", q.index, "input")
        return overflow(err, cfg, stats)
    cut = sum(len(p) for p in profile[keep:])
    if stats is not None:
        stats.built += 1
        stats.history_truncated += int(cut > 0)
        stats.history_chars_cut += cut
    ids = list(enc["input_ids"])
    return dict(
        input_ids=np.asarray(ids + list(resp), np.int32),  # [n]
        loss_mask=np.asarray([0] * len(ids) + [1] * len(resp), np.int32),  # [n]
        user_end=enc.char_to_token(len(user)),
        news_end=enc.char_to_token(len(user) + len(news)),
        prompt_len=len(ids),
        n_truncated_history_chars=cut,
    )
