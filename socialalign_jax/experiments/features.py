"""The frozen model's head inputs, computed once per dataset and cached on disk.

The sentiment head reads the final hidden state (after the final norm) at the last prompt
token (`decoder.sentiment_logits`). With the base model frozen and no adapter, that vector is
a fixed function of the prompt, so design A (docs/experiments.md) computes it once per
example and trains every head of every cell on the cache.

Layout of a cache directory:

    manifest.json          key, what it was computed from, progress (chunks done), complete flag
    examples.npz           per example: event index, label, prompt length, case index, dataset row
    events.json            per event: name, real distribution (its target: the crowd, or all its
                           labelled responses), count, noise floor
    texts.json             per example: the news span, the user span and the response, as text (the
                           classical baselines of experiments/forecast.py read what the model reads)
    chunk_00000.npz ...    features [n, D] float32 and the example positions they belong to

The key is a sha256 over the model's parameters, the tokenizer file and the token ids of
every selected prompt (which carry the rendered template): a change to any of them gives a
new key, and a cache with another key is recomputed from scratch rather than trusted. Labels
and targets are not features: a dataset rebuilt with another labeller (same prompts) keeps its
features, its examples/events/texts files are rewritten, and `FeatureSet.key` (what an
experiment's cells are keyed by) covers them too, so no cell of the old labels is reused.
Chunks are written atomically and recorded in the manifest after they land, so a killed
computation resumes at the first missing chunk. No pickle: npz arrays and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from socialalign_jax.core import atomic_io
from socialalign_jax.core.buckets import bucket
from socialalign_jax.core.errors import UserError
from socialalign_jax.model import backend, decoder

MANIFEST = "manifest.json"
EXAMPLES = "examples.npz"
EVENTS = "events.json"
TEXTS = "texts.json"
FORMAT = 1
LENGTH_STEP = 32  # prompt lengths are padded up to a multiple of this (few shapes compile)


# ----------------------------------------------------------------------------- selection

def select_examples(dataset, *, max_cases_per_event: int = 0, num_events: int = 0, min_cases: int = 1,
                    seed: int = 0) -> dict[str, Any]:
    """Pick the examples to featurise from a built dataset (every split: the folds re-split it).

    num_events > 0: a seeded sample of that many events among those with >= min_cases built
    examples (all of them when fewer qualify); max_cases_per_event > 0: a seeded sample of at
    most that many examples per event. Returns the examples (prompt ids, labels, ...) and the
    event table with each event's real distribution over ALL its labelled responses (the
    dataset's targets, which also count responses later skipped for length).
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xFEA7])
    names = list(dataset.metadata["events"])
    rows: list[tuple[str, int]] = []
    for split in sorted(dataset.sources):
        ix = dataset.index(split)
        rows += [(split, i) for i in range(len(ix["event_id"]))]
    eids = np.concatenate([dataset.index(s)["event_id"] for s in sorted(dataset.sources)]).astype(np.int64)
    # The real distribution per event: the split entry holding the most labelled responses.
    real: dict[int, dict] = {}
    for split_targets in dataset.metadata["targets"].values():
        for e, t in split_targets.items():
            if t["count"] > real.get(int(e), {"count": -1})["count"]:
                real[int(e)] = t
    candidates = [e for e in np.unique(eids) if (eids == e).sum() >= min_cases and real.get(int(e), {}).get("count", 0)]
    if num_events > 0 and len(candidates) > num_events:
        candidates = sorted(rng.choice(candidates, size=num_events, replace=False).tolist())
    chosen: list[int] = []
    for e in candidates:
        idx = np.flatnonzero(eids == e)
        if max_cases_per_event > 0 and idx.size > max_cases_per_event:
            idx = np.sort(rng.choice(idx, size=max_cases_per_event, replace=False))
        chosen += idx.tolist()
    chosen.sort()
    if not chosen:
        raise UserError(f"{dataset.path}: no event has >= {min_cases} examples and a labelled response")
    event_pos = {int(e): i for i, e in enumerate(candidates)}
    prompts, ex = [], {k: [] for k in ("event", "label", "prompt_len", "case_index", "row")}
    for r in chosen:
        split, i = rows[r]
        rec = dataset.source(split)[i]
        n = int(rec["prompt_len"])
        prompts.append(np.asarray(rec["input_ids"][:n], np.int32))
        ex["event"].append(event_pos[int(rec["event_id"])])
        ex["label"].append(int(rec["label"]))
        ex["prompt_len"].append(n)
        ex["case_index"].append(int(rec["case_index"]))
        ex["row"].append(r)
    events = [{"name": names[e], "real": [float(x) for x in real[e]["dist"]], "count": int(real[e]["count"]),
               "noise_floor": real[e].get("noise_floor")} for e in candidates]
    return {"prompts": prompts, "examples": {k: np.asarray(v, np.int64) for k, v in ex.items()},
            "events": events, "classes": list(dataset.metadata.get("classes") or []),
            "pad_id": int(dataset.pad_id)}


def example_texts(dataset, selection: dict, tokenizer) -> list[dict[str, str]]:
    """Per selected example: its prompt's news span and user span decoded to text, and its response."""
    rows: list[tuple[str, int]] = []
    for split in sorted(dataset.sources):
        rows += [(split, i) for i in range(len(dataset.index(split)["event_id"]))]
    out = []
    for r in selection["examples"]["row"]:
        split, i = rows[int(r)]
        rec = dataset.source(split)[i]
        ids = np.asarray(rec["input_ids"]).tolist()
        ue, ne = int(rec["user_end"]), int(rec["news_end"])
        resp = rec["response"]
        out.append({"user": tokenizer.decode(ids[:ue]), "news": tokenizer.decode(ids[ue:ne]),
                    "response": resp.decode("utf-8") if isinstance(resp, bytes) else str(resp)})
    return out


# ----------------------------------------------------------------------------- key

def params_digest(params) -> str:
    """sha256 over every parameter leaf (path, dtype, shape, bytes), in sorted path order."""
    import jax

    h = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's serialised form (vocabulary, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompts_digest(prompts: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        a = np.asarray(p, np.int32)
        h.update(np.int64(a.size).tobytes())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_key(model_digest: str, tok_digest: str, prompt_digest: str) -> str:
    return hashlib.sha256(f"v{FORMAT}|{model_digest}|{tok_digest}|{prompt_digest}".encode()).hexdigest()


# ----------------------------------------------------------------------------- computation

def make_feature_fn(model_cfg):
    """jit'd f(params, ids [B, S], mask [B, S], prompt_len [B]) -> [B, D] float32: the head's input.

    Frozen params are an argument (never closed over). The gather is the one in
    `decoder.sentiment_logits`; tests check that head(features) equals sentiment_logits.
    """
    import jax
    import jax.numpy as jnp

    model_cfg, _ = backend.resolve_for_platform(model_cfg, None)  # 'auto' choices on the host, default devices

    def features(params, ids, mask, prompt_len):
        out = decoder.forward(params, ids, model_cfg, attention_mask=mask, logits_at=None, deterministic=True)
        idx = jnp.clip(prompt_len - 1, 0, ids.shape[1] - 1)
        return jnp.take_along_axis(out.hidden, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)

    return jax.jit(features)


def example_order(selection: dict, kind: str, chunk_size: int) -> np.ndarray:
    """The positions in computation order. 'events': events in a fixed random order (seed 0 over
    the event table), each chunk sorted by prompt length; 'length' (caches written before the
    event order existed): all examples by prompt length."""
    lens = np.asarray([len(p) for p in selection["prompts"]])
    if kind == "length":
        return np.argsort(lens, kind="stable")
    if kind != "events":
        raise UserError(f"feature cache: unknown example order {kind!r}")
    ev = np.asarray(selection["examples"]["event"])
    perm = np.random.default_rng(0).permutation(len(selection["events"]))
    rank = np.empty_like(perm)
    rank[perm] = np.arange(perm.size)
    order = np.lexsort((np.arange(ev.size), rank[ev]))  # by event rank, then stored order
    for c in range(0, order.size, chunk_size):
        part = order[c:c + chunk_size]
        order[c:c + chunk_size] = part[np.argsort(lens[part], kind="stable")]
    return order


def compute(out_dir: str | os.PathLike, selection: dict, params, model_cfg, *, model_digest: str,
            tok_digest: str, info: dict | None = None, batch_size: int = 8, chunk_size: int = 64,
            progress: bool = True, log=print) -> Path:
    """Featurise `selection` into out_dir, resuming from the chunks already there.

    Chunks follow a seeded random order of the EVENTS (an event's examples stay together), so
    the chunks done at any moment cover a random sample of the events: a cache still being
    computed can be used, as such a sample, with `FeatureSet(path, allow_partial=True)`.
    Within a chunk examples run in order of prompt length (less padding; lengths are padded
    to multiples of 32, so few shapes compile). Returns the directory.
    """
    import jax

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = selection["prompts"]
    key = cache_key(model_digest, tok_digest, prompts_digest(prompts))
    n = len(prompts)
    n_chunks = -(-n // chunk_size)
    man_path = out / MANIFEST
    manifest = None
    if man_path.exists():
        manifest = json.loads(man_path.read_text("utf-8"))
        if manifest.get("key") != key or manifest.get("chunk_size") != chunk_size:
            log(f"{out}: cache key changed (model, tokenizer or prompts differ); recomputing")
            for f in out.glob("chunk_*.npz"):
                f.unlink()
            manifest = None
    # Labels, targets and texts are rewritten on every call: they are not features (a relabelled
    # dataset keeps its prompts and so its key), and FeatureSet.key hashes them for the cells.
    buf = {k: v for k, v in selection["examples"].items()}
    atomic_io.atomic_write(out / EXAMPLES, lambda f: np.savez(f, **buf), binary=True)
    atomic_io.write_json({"events": selection["events"], "classes": selection["classes"]}, out / EVENTS)
    if selection.get("texts") is not None:
        atomic_io.write_json(selection["texts"], out / TEXTS)
    if manifest is None:
        manifest = {"format": FORMAT, "key": key, "model_digest": model_digest, "tokenizer_digest": tok_digest,
                    "prompts_digest": prompts_digest(prompts), "num_examples": n, "chunk_size": chunk_size,
                    "num_chunks": n_chunks, "hidden_size": int(model_cfg.hidden_size), "done": [],
                    "complete": False, "seconds": 0.0, "prompt_tokens": int(sum(len(p) for p in prompts)),
                    "order": "events",
                    "info": dict(info or {})}
        atomic_io.write_json(manifest, man_path)
    order = example_order(selection, manifest.get("order", "length"), chunk_size)
    done = set(manifest["done"])
    todo = [c for c in range(n_chunks) if c not in done]
    if not todo:
        return out
    fn = make_feature_fn(model_cfg)
    pad = selection["pad_id"]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, initial=sum(min(chunk_size, n - c * chunk_size) for c in done), unit="prompt",
                   desc=f"features {out.name}", mininterval=5.0)
    for c in todo:
        t0 = time.time()
        pos = order[c * chunk_size:(c + 1) * chunk_size]
        feats = np.zeros((pos.size, model_cfg.hidden_size), np.float32)
        for s in range(0, pos.size, batch_size):
            part = pos[s:s + batch_size]
            seq = bucket(max(len(prompts[i]) for i in part), multiple=LENGTH_STEP)
            ids = np.full((batch_size, seq), pad, np.int32)
            mask = np.zeros((batch_size, seq), np.int32)
            plen = np.ones((batch_size,), np.int32)
            mask[:, 0] = 1  # padding rows: one attended token, so no softmax is fully masked
            for r, i in enumerate(part):
                p = prompts[i]
                ids[r, :len(p)] = p
                mask[r, :len(p)] = 1
                plen[r] = len(p)
            h = np.asarray(jax.device_get(fn(params, ids, mask, plen)))
            feats[s:s + part.size] = h[:part.size]
            if bar is not None:
                bar.update(part.size)
        atomic_io.atomic_write(out / f"chunk_{c:05d}.npz",
                               lambda f: np.savez(f, positions=pos.astype(np.int64), features=feats), binary=True)
        manifest["done"] = sorted(done | {c})
        done.add(c)
        manifest["seconds"] = float(manifest["seconds"]) + time.time() - t0
        manifest["complete"] = len(done) == n_chunks
        atomic_io.write_json(manifest, man_path)
    if bar is not None:
        bar.close()
    return out


class FeatureSet:
    """A complete cache, loaded: features [N, D], per-example arrays, the event table."""

    def __init__(self, path: str | os.PathLike, *, allow_partial: bool = False):
        self.path = Path(path)
        man = self.path / MANIFEST
        if not man.exists():
            raise UserError(f"{self.path}: no feature cache ({MANIFEST} missing); compute it first "
                            "(python launch/experiment.py features ...)")
        self.manifest = json.loads(man.read_text("utf-8"))
        self.partial = not self.manifest.get("complete")
        if self.partial and not (allow_partial and self.manifest.get("order") == "events"):
            raise UserError(f"{self.path}: feature cache incomplete ({len(self.manifest['done'])} of "
                            f"{self.manifest['num_chunks']} chunks); rerun the feature command to resume")
        with np.load(self.path / EXAMPLES) as z:
            self.examples = {k: z[k] for k in z.files}
        ev = json.loads((self.path / EVENTS).read_text("utf-8"))
        self.events, self.classes = ev["events"], ev["classes"]
        texts = self.path / TEXTS
        self.texts: list[dict] | None = json.loads(texts.read_text("utf-8")) if texts.exists() else None
        h = hashlib.sha256(self.manifest["key"].encode())
        for k in sorted(self.examples):
            h.update(k.encode() + np.ascontiguousarray(self.examples[k]).tobytes())
        h.update(json.dumps(ev, sort_keys=True).encode())
        self._key = h.hexdigest()
        n = int(self.manifest["num_examples"])
        self.features = np.zeros((n, int(self.manifest["hidden_size"])), np.float32)
        seen = np.zeros(n, bool)
        for c in sorted(self.manifest["done"]):
            with np.load(self.path / f"chunk_{c:05d}.npz") as z:
                self.features[z["positions"]] = z["features"]
                seen[z["positions"]] = True
        if not self.partial and not seen.all():
            raise UserError(f"{self.path}: {int((~seen).sum())} examples have no features; delete the cache and rerun")
        if self.partial:  # keep the events whose every selected example is done (a random sample of events)
            ev = self.examples["event"]
            missing = np.zeros(len(self.events), bool)
            missing[ev[~seen]] = True
            keep_ev = np.flatnonzero(~missing)
            remap = -np.ones(len(self.events), np.int64)
            remap[keep_ev] = np.arange(keep_ev.size)
            keep = ~missing[ev]
            self.examples = {k: v[keep] for k, v in self.examples.items()}
            self.examples["event"] = remap[self.examples["event"]]
            self.features = self.features[keep]
            if self.texts is not None:
                self.texts = [t for t, k in zip(self.texts, keep) if k]
            self.events = [self.events[i] for i in keep_ev]

    @property
    def key(self) -> str:
        """The features' key plus a hash of the labels and targets: what decides a cell's result."""
        return self._key

    @property
    def counts(self) -> np.ndarray:
        """[E] responses behind each event's target."""
        return np.asarray([e["count"] for e in self.events], np.float64)

    @property
    def noise_floor(self) -> np.ndarray:
        """[E] each target's noise floor (nan where the cache predates it)."""
        return np.asarray([np.nan if e.get("noise_floor") is None else e["noise_floor"] for e in self.events])

    @property
    def event_names(self) -> list[str]:
        return [e["name"] for e in self.events]

    @property
    def real(self) -> np.ndarray:
        """[E, K] real distribution per event."""
        return np.asarray([e["real"] for e in self.events], np.float64)
