"""Persona extraction: a five-item `user_persona` per case, written by a model from the user's posts.

The prompt template carries a persona line, but most raw data has none. This module asks a
model (through our own `sampling.generate`) to summarise each user's history posts into five
fixed items and writes the event files back with `user_persona` filled, so every later stage
reads the same on-disk format.

Persona format (a documented rule, not a silent cut): exactly five lines `项目: 内容` in the
order of PERSONA_ITEMS, each 内容 at most MAX_ITEM_CHARS characters (longer answers are cut
to that length and counted); an item the model did not give is `未知` and counted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from socialalign_jax.core.atomic_io import write_json
from socialalign_jax.core.buckets import bucket
from socialalign_jax.core.errors import UserError
from socialalign_jax.data.prompt import format_post
from socialalign_jax.data.records import Case, DataError, load_json, read_event_file
from socialalign_jax.model import backend, sampling
from socialalign_jax.model.sampling import SamplingConfig
from socialalign_jax.weights.tokenizer import chat_template

PERSONA_ITEMS = ("兴趣话题", "语言风格", "情感基调", "性格特点", "价值观")
MAX_ITEM_CHARS = 20
UNKNOWN = "未知"
DEFAULT_MAX_HISTORY = 10
LENGTH_BUCKET = 32  # prompt lengths are rounded up to a multiple of this (few recompiles)

PERSONA_PROMPT = (
    "下面是微博用户“{user_name}”发过的微博：\n"
    "{posts}\n"
    "请根据这些微博概括这位用户的画像，按以下五项各写一行，格式为“项目: 内容”，"
    "每项内容不超过20个字：\n"
    "兴趣话题: \n语言风格: \n情感基调: \n性格特点: \n价值观: \n"
    "只输出这五行，不要其他内容。"
)


def persona_prompt(case: Case, max_history: int = DEFAULT_MAX_HISTORY) -> str:
    """The user turn asking for the persona: the first `max_history` history posts, numbered.

    Posts are rendered as in the response prompt (retweets read 你转发了微博: ..., 并评论说: ...).
    """
    posts = [format_post(p) for p in case.history[:max_history]]
    return PERSONA_PROMPT.format(user_name=case.user_name,
                                 posts="\n".join(f"{i}. {p}" for i, p in enumerate(posts, 1)))


@dataclasses.dataclass(frozen=True)
class ParsedPersona:
    text: str                     # five lines "项目: 内容"
    missing: tuple[str, ...]      # items filled with UNKNOWN
    truncated: tuple[str, ...]    # items cut to MAX_ITEM_CHARS


_LINE = re.compile(r"^\s*(?:[-*•·]+|\d+[.、)）]|[（(]\d+[)）])?\s*\**\s*(?P<key>[^:：*]+?)\s*\**\s*[:：]\s*(?P<value>.*)$")


def parse_persona(answer: str) -> ParsedPersona:
    """Read the five items out of a model answer.

    A line counts when it reads `项目: 内容` (ASCII or full-width colon, optional list marker
    or markdown bold) with 项目 one of PERSONA_ITEMS; the first such line per item wins and
    other lines are ignored. Empty or missing items become UNKNOWN; items longer than
    MAX_ITEM_CHARS are cut to that length.
    """
    found: dict[str, str] = {}
    for line in answer.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        key, value = m["key"].strip(), " ".join(m["value"].split()).strip("*").strip()
        if key in PERSONA_ITEMS and key not in found and value:
            found[key] = value
    missing = tuple(k for k in PERSONA_ITEMS if k not in found)
    truncated = tuple(k for k in PERSONA_ITEMS if len(found.get(k, "")) > MAX_ITEM_CHARS)
    lines = [f"{k}: {found.get(k, UNKNOWN)[:MAX_ITEM_CHARS]}" for k in PERSONA_ITEMS]
    return ParsedPersona("\n".join(lines), missing, truncated)


@dataclasses.dataclass
class PersonaSummary:
    files: int = 0
    cases: int = 0
    generated: int = 0
    kept: int = 0
    no_history: int = 0         # cases without history posts: all five items UNKNOWN, no model call
    parse_fallbacks: int = 0    # generated personas with at least one UNKNOWN item
    missing_items: int = 0
    truncated_items: int = 0

    def line(self) -> str:
        return (f"{self.files} event files, {self.cases} cases: {self.generated} personas generated, "
                f"{self.kept} existing kept, {self.no_history} without history (all {UNKNOWN}), "
                f"{self.parse_fallbacks} with parse fallbacks ({self.missing_items} items {UNKNOWN}), "
                f"{self.truncated_items} items cut to {MAX_ITEM_CHARS} characters")


def generate_answers(params, cfg, tokenizer, prompts: Sequence[str], scfg: SamplingConfig, *,
                     batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[str]:
    """Sample one reply per user turn (ChatML, no system turn) with the base model.

    Fixed batch shape (short batches are filled with copies of their first prompt) and prompt
    lengths rounded up to LENGTH_BUCKET, so a corpus compiles a few times. Batch k uses
    fold_in(PRNGKey(seed), k).
    """
    enc = [tokenizer.encode(chat_template([{"role": "user", "content": p}], add_generation_prompt=True),
                            add_special_tokens=False) for p in prompts]
    # 'auto' backend choices made here, on the host, for the default devices (model/backend.py).
    cfg, _ = backend.resolve_for_platform(cfg, None)
    scfg = backend.resolve_sampling(scfg)
    key = jax.random.PRNGKey(seed)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(enc), desc="personas", unit="case", dynamic_ncols=True)
    answers: list[str] = []
    try:
        for k, start in enumerate(range(0, len(enc), batch_size)):
            rows = enc[start:start + batch_size]
            n_real = len(rows)
            rows = rows + [rows[0]] * (batch_size - n_real)
            ids, mask = sampling.left_pad(rows, scfg.pad_id, bucket(max(map(len, rows)), multiple=LENGTH_BUCKET))
            zeros = np.zeros((batch_size,), np.int32)  # no adapters: spans are not read
            out = sampling.generate(params, None, ids, mask, cfg, None, scfg, (zeros, zeros),
                                    jax.random.fold_in(key, k))
            tokens, lengths = jax.device_get((out.tokens, out.lengths))
            for r in range(n_real):
                t = [int(x) for x in tokens[r, :int(lengths[r])]]
                if t and t[-1] in scfg.stop_tokens:
                    t = t[:-1]
                answers.append(tokenizer.decode(t, skip_special_tokens=True))
            if bar is not None:
                bar.update(n_real)
    finally:
        if bar is not None:
            bar.close()
    return answers


def build_personas(params, cfg, tokenizer, input_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   scfg: SamplingConfig, batch_size: int = 8, seed: int = 0, overwrite_existing: bool = False,
                   max_history: int = DEFAULT_MAX_HISTORY, progress: bool = True) -> PersonaSummary:
    """Fill `user_persona` in every event file of input_dir and write them to out_dir (same names).

    Every file is read and validated (records.read_event_file, short histories allowed) and
    every prompt checked against the model's context before any compute, so bad input costs
    nothing. Everything except `user_persona` is written back as it was read.
    """
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if not input_dir.is_dir():
        raise DataError(input_dir, "not a directory")
    files = sorted(input_dir.glob("*.json"))
    if not files:
        raise DataError(input_dir, "no *.json event files")
    if out_dir.exists() and out_dir.resolve() == input_dir.resolve():
        raise UserError(f"{out_dir}: the output directory is the input directory; pick another --out")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    summary = PersonaSummary(files=len(files))
    raws, jobs, prompts = [], [], []  # jobs: (file index, case index)
    limit = cfg.max_position_embeddings - scfg.max_new_tokens
    for fi, path in enumerate(files):
        event = read_event_file(path, allow_short_history=True)
        raws.append(load_json(path))
        for ci, case in enumerate(event.cases):
            summary.cases += 1
            if case.persona is not None and not overwrite_existing:
                summary.kept += 1
                continue
            if not case.history:
                summary.no_history += 1
                raws[fi]["cases"][ci]["user_persona"] = parse_persona("").text
                continue
            prompt = persona_prompt(case, max_history)
            n = len(tokenizer.encode(prompt, add_special_tokens=False))
            if n > limit:
                raise DataError(path, f"persona prompt of about {n} tokens plus {scfg.max_new_tokens} new tokens "
                                      f"exceeds the model context {cfg.max_position_embeddings} "
                                      "(lower --max_history or --max_new_tokens)", ci, "history")
            jobs.append((fi, ci))
            prompts.append(prompt)
    answers = generate_answers(params, cfg, tokenizer, prompts, scfg, batch_size=batch_size, seed=seed,
                               progress=progress) if prompts else []
    for (fi, ci), answer in zip(jobs, answers):
        parsed = parse_persona(answer)
        raws[fi]["cases"][ci]["user_persona"] = parsed.text
        summary.generated += 1
        summary.parse_fallbacks += bool(parsed.missing)
        summary.missing_items += len(parsed.missing)
        summary.truncated_items += len(parsed.truncated)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create output directory ({e.strerror or e})") from None
    for path, raw in zip(files, raws):
        write_json(raw, out_dir / path.name)
    return summary
