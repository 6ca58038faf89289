"""Fit the char n-gram sentiment labeller (NgramLabeller) on human-labelled Weibo text, write the
bundled model file and print the evaluation table of docs/labellers.md.

A development tool: it needs scikit-learn (`pip install scikit-learn`, or `pip install -e '.[test]'`,
whose extra lists it) and snownlp (a dependency of the package) for the SnowNLP rows. The labeller
itself reads the written file with numpy only.

    PYTHONPATH=. python scripts/fit_labeller.py [--data DIR] [--out FILE] [--boot 1000]
    PYTHONPATH=. taskset -c 0 python scripts/fit_labeller.py --speed 500000   # labelling speed, one core

DIR holds weibo2018/{train,test}.txt and smp2020_ewect/clean/*.txt (default: $SOCIALALIGN_SHARED/data,
else ../shared/data beside the repository); without them the script stops with one line.
Protocol (docs/labellers.md):
  * fit on the TRAIN files only: weibo2018 train.txt (binary) + EWECT virus_train.txt (mapped);
  * choose C, min_df, the vocabulary size and the class weighting on the EVAL files only
    (usual_eval + virus_eval): the mean over the two files of 3-class macro-F1; the SnowNLP
    thresholds "tuned" row is chosen the same way;
  * report on the TEST files (usual_test, virus_test, weibo2018 test.txt) with 95% bootstrap
    intervals over test texts; nothing is selected on them.
EWECT -> 3 classes: happy -> positive; angry, sad, fear -> negative; neutral -> neutral;
surprise is left out of training and scoring (its valence is not given).
The written .npz is deterministic (fixed zip timestamps) for a given scikit-learn/numpy build.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from socialalign_jax.data.labellers import (NGRAM_FORMAT, NGRAM_MODEL, LexiconLabeller,  # noqa: E402
                                            NgramLabeller, normalize_weibo)

LABELS = ("negative", "neutral", "positive")
EWECT_MAP = {"happy": "positive", "angry": "negative", "sad": "negative", "fear": "negative",
             "neutral": "neutral", "surprise": None}  # None: left out of training and scoring
WEIBO2018_MAP = {"0": "negative", "1": "positive"}
TRAIN = ("weibo2018/train", "ewect/virus_train")
EVAL = ("ewect/usual_eval", "ewect/virus_eval")
TEST = ("ewect/usual_test", "ewect/virus_test", "weibo2018/test")
FILES = {"weibo2018/train": "weibo2018/train.txt", "weibo2018/test": "weibo2018/test.txt",
         "ewect/virus_train": "smp2020_ewect/clean/virus_train.txt",
         "ewect/usual_eval": "smp2020_ewect/clean/usual_eval_labeled.txt",
         "ewect/virus_eval": "smp2020_ewect/clean/virus_eval_labeled.txt",
         "ewect/usual_test": "smp2020_ewect/clean/usual_test_labeled.txt",
         "ewect/virus_test": "smp2020_ewect/clean/virus_test_labeled.txt"}
# The hyperparameter grid searched on the eval files.
# Vocabularies as (min_df, max_features): the most frequent 50k/100k/150k n-grams seen in at least
# 2 training texts, or every n-gram seen in at least 3 (~104k) or 5 (~56k) texts.
GRID = {"vocabulary": ((2, 50_000), (2, 100_000), (2, 150_000), (3, None), (5, None)),
        "C": (0.25, 0.5, 1.0, 2.0, 4.0), "class_weight": (None, "balanced")}


def default_data_dir() -> Path:
    """$SOCIALALIGN_SHARED/data, else ../shared/data next to the repository root."""
    env = os.environ.get("SOCIALALIGN_SHARED")
    return Path(env) / "data" if env else ROOT.parent / "shared" / "data"


def missing_files(data: Path) -> list[str]:
    return [rel for rel in FILES.values() if not (data / rel).is_file()]


# ----------------------------------------------------------------------------- data

_TOPIC = re.compile(r"\{%#(.*?)#%\}")
_ANCHOR = re.compile(r"\{%.*?%\}")


def decode_weibo2018(text: str) -> str:
    """weibo2018's encodings back to how Weibo text reads: {%#topic#%} -> #topic#; other {%...%}
    (a link, place or video title, which CED has as a URL) -> a space. normalize_weibo does the same,
    so the n-gram features do not change; SnowNLP gets Weibo-like text."""
    return _ANCHOR.sub(" ", _TOPIC.sub(r"#\1#", text))


def read_split(data: Path, split: str) -> tuple[list[str], list[str], list[str]]:
    """(texts, 3-class labels or None where left out, original labels) of one file."""
    path = data / FILES[split]
    if split.startswith("weibo2018/"):
        texts, gold, orig = [], [], []
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(",", 2)
            if len(parts) != 3 or parts[1] not in WEIBO2018_MAP:
                raise SystemExit(f"error: {path}:{n}: expected 'mid,0|1,text'")
            texts.append(decode_weibo2018(parts[2]))
            gold.append(WEIBO2018_MAP[parts[1]])
            orig.append(parts[1])
        return texts, gold, orig
    rows = json.loads(path.read_text("utf-8"))
    return ([r["content"] for r in rows], [EWECT_MAP[r["label"]] for r in rows], [r["label"] for r in rows])


def kept(texts, gold):
    """The texts and labels scored / trained on (surprise left out)."""
    keep = [i for i, g in enumerate(gold) if g is not None]
    return [texts[i] for i in keep], np.array([LABELS.index(gold[i]) for i in keep])


# ----------------------------------------------------------------------------- metrics

def confusion(y, p, k=3, w=None):
    return np.bincount(y * k + p, weights=w, minlength=k * k).reshape(k, k)


def macro_f1_from(cm, classes):
    """Mean F1 over `classes` (rows: gold, columns: predicted; a class never predicted and never
    present scores 0, as scikit-learn's zero_division=0)."""
    f = []
    for c in classes:
        tp, pred, gold = cm[..., c, c], cm[..., :, c].sum(-1), cm[..., c, :].sum(-1)
        denom = pred + gold
        f.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0))
    return np.mean(f, axis=0)


def scores(y, p, classes):
    cm = confusion(y, p)
    return macro_f1_from(cm, classes), np.trace(cm) / cm.sum()


def bootstrap(y, preds: dict, classes, boot: int, seed: int = 0):
    """Per labeller: (macro-F1, acc) point estimates and 95% percentile intervals over resampled
    texts; the same resamples for every labeller (paired)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    w = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(boot)])  # [B, n]
    out = {}
    for name, p in preds.items():
        onehot = np.zeros((n, 9))
        onehot[np.arange(n), y * 3 + p] = 1
        cms = (w @ onehot).reshape(boot, 3, 3)
        f1s = macro_f1_from(cms, classes)
        accs = np.trace(cms, axis1=1, axis2=2) / n
        out[name] = {"f1": scores(y, p, classes)[0], "acc": scores(y, p, classes)[1], "f1_boot": f1s, "acc_boot": accs}
    return out


def ci(a):
    lo, hi = np.percentile(a, [2.5, 97.5])
    return lo, hi


# ----------------------------------------------------------------------------- model file

def export(vectorizer, clf, path: Path, meta: dict, labels=None) -> None:
    """Write the fitted scikit-learn vectorizer + classifier as the numpy-only model file.
    `labels`: the class names when the classifier was fitted on class ids (classes_ index them)."""
    vocab = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
    classes = [labels[int(c)] for c in clf.classes_] if labels else [str(c) for c in clf.classes_]
    coef = np.asarray(clf.coef_, dtype=np.float64)
    intercept = np.asarray(clf.intercept_, dtype=np.float64)
    if coef.shape[0] != len(classes):
        raise ValueError(f"expected one coefficient row per class ({len(classes)} classes), got {coef.shape[0]}")
    arrays = {"format": np.array(NGRAM_FORMAT), "labels": np.array(classes), "vocab": np.array(vocab),
              "idf": vectorizer.idf_.astype(np.float32), "coef": coef.astype(np.float32),
              "intercept": intercept.astype(np.float32), "ngram_range": np.array(vectorizer.ngram_range),
              "meta": np.array(json.dumps(meta, ensure_ascii=False, sort_keys=True))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, a in arrays.items():  # fixed timestamps: same arrays -> same bytes
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)


def make_pipeline(min_df, max_features, C, class_weight):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), preprocessor=normalize_weibo, token_pattern=None,
                          min_df=min_df, max_features=max_features, sublinear_tf=True, norm="l2",
                          dtype=np.float64)
    clf = LogisticRegression(C=C, class_weight=class_weight, max_iter=3000)
    return vec, clf


# ----------------------------------------------------------------------------- main

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ced_texts(data: Path, n: int) -> list[str]:
    """Up to n CED responses (their own words, as the CED converter keeps them), in archive order."""
    import tarfile

    from socialalign_jax.data.converters.ced import own_words
    out = []
    with tarfile.open(data / "ced" / "CED_Dataset.tar.gz") as tar:
        for m in tar:
            if m.isfile() and "-repost/" in m.name and m.name.endswith(".json"):
                for r in json.load(tar.extractfile(m)):
                    own, _ = own_words(r.get("text") or "")
                    if own is not None:
                        out.append(own)
                if len(out) >= n:
                    return out[:n]
    return out


def speed(data: Path, n: int) -> int:
    """Time NgramLabeller().label on n CED responses (cycled if CED has fewer)."""
    if not (data / "ced" / "CED_Dataset.tar.gz").is_file():
        print(f"error: {data / 'ced' / 'CED_Dataset.tar.gz'} not found", file=sys.stderr)
        return 2
    texts = ced_texts(data, n)
    distinct = len(texts)
    texts = (texts * (n // max(len(texts), 1) + 1))[:n]
    t0 = time.perf_counter()
    ng = NgramLabeller()
    t1 = time.perf_counter()
    labels = ng.label(texts)
    t2 = time.perf_counter()
    share = {c: round(labels.count(c) / len(labels), 3) for c in ng.labels}
    print(f"ngram: loaded in {t1 - t0:.2f}s; labelled {len(texts)} CED responses ({distinct} read from the archive, "
          f"mean {np.mean([len(t) for t in texts]):.1f} characters) in {t2 - t1:.1f}s = "
          f"{len(texts) / (t2 - t1):,.0f} texts/s; shares {share}", flush=True)
    few = texts[:5000]
    t0 = time.perf_counter()
    snow = LexiconLabeller().label(few)
    t1 = time.perf_counter()
    share = {c: round(snow.count(c) / len(snow), 3) for c in ng.labels}
    agree = np.mean([a == b for a, b in zip(snow, labels)])
    print(f"snownlp: labelled the first {len(few)} in {t1 - t0:.1f}s = {len(few) / (t1 - t0):,.0f} texts/s; "
          f"shares {share}; "
          f"same label as ngram on {agree:.1%} of them")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="folder with weibo2018/ and smp2020_ewect/clean/")
    ap.add_argument("--out", type=Path, default=NGRAM_MODEL, help="model file to write (default: the bundled one)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    ap.add_argument("--json", type=Path, default=None, help="also write every number as JSON here")
    ap.add_argument("--fixed", default=None, metavar="min_df=N,max_features=N|none,C=X,class_weight=none|balanced",
                    help="skip the search and fit these hyperparameters (a quick check; the docs come from the search)")
    ap.add_argument("--speed", type=int, default=0, metavar="N",
                    help="only time the bundled labeller on N CED responses (needs ced/CED_Dataset.tar.gz)")
    args = ap.parse_args(argv)
    data = args.data or default_data_dir()
    if args.speed:
        return speed(data, args.speed)
    if not data.is_dir() or missing_files(data):
        what = "not found" if not data.is_dir() else f"lacks {', '.join(missing_files(data))}"
        print(f"error: data folder {data} {what} (needs weibo2018/ and smp2020_ewect/clean/; "
              "pass --data DIR or set SOCIALALIGN_SHARED)", file=sys.stderr)
        return 2
    try:
        import sklearn
    except ImportError:
        print("error: scripts/fit_labeller.py needs scikit-learn: pip install scikit-learn", file=sys.stderr)
        return 2

    raw = {s: read_split(data, s) for s in FILES}
    sets = {s: kept(raw[s][0], raw[s][1]) for s in FILES}
    tr_x = [t for s in TRAIN for t in sets[s][0]]
    tr_y = np.concatenate([sets[s][1] for s in TRAIN])
    print(f"train: {len(tr_x)} texts ({', '.join(f'{s} {len(sets[s][0])}' for s in TRAIN)}); class counts "
          + ", ".join(f"{LABELS[c]} {int((tr_y == c).sum())}" for c in range(3)), flush=True)
    classes3 = (0, 1, 2)

    # 1. hyperparameters on the eval files
    t0 = time.time()
    grid = []
    fixed = dict(kv.split("=") for kv in args.fixed.split(",")) if args.fixed else None
    if fixed:
        mf = None if fixed["max_features"] == "none" else int(fixed["max_features"])
        fixed = {"vocabulary": [(int(fixed["min_df"]), mf)], "C": [float(fixed["C"])],
                 "class_weight": [None if fixed["class_weight"] == "none" else fixed["class_weight"]]}
    g = fixed or GRID
    for min_df, max_features in g["vocabulary"]:
        vec, _ = make_pipeline(min_df, max_features, 1.0, None)
        xtr = vec.fit_transform(tr_x)
        xev = {s: vec.transform(sets[s][0]) for s in EVAL}
        for C in g["C"]:
            for cw in g["class_weight"]:
                _, clf = make_pipeline(min_df, max_features, C, cw)
                clf.fit(xtr, tr_y)
                f = {s: scores(sets[s][1], clf.predict(xev[s]), classes3)[0] for s in EVAL}
                row = dict(min_df=min_df, max_features=max_features, vocab=len(vec.vocabulary_), C=C,
                           class_weight=cw or "none", **{s: float(v) for s, v in f.items()},
                           mean=float(np.mean(list(f.values()))))
                grid.append(row)
                print(f"  min_df {min_df} max_features {max_features} (vocab {row['vocab']}) C {C} "
                      f"class_weight {row['class_weight']}: eval macro-F1 "
                      + " ".join(f"{s} {f[s]:.4f}" for s in EVAL) + f" mean {row['mean']:.4f}", flush=True)
    # best mean; ties -> the smaller vocabulary, then the smaller C (simpler model)
    best = max(grid, key=lambda r: (round(r["mean"], 6), -r["vocab"], -r["C"]))
    print(f"grid: {len(grid)} fits in {time.time() - t0:.0f}s; chosen: {best}", flush=True)

    # 2. refit the chosen model on the train files, write it
    cw = None if best["class_weight"] == "none" else best["class_weight"]
    vec, clf = make_pipeline(best["min_df"], best["max_features"], best["C"], cw)
    xtr = vec.fit_transform(tr_x)
    clf.fit(xtr, tr_y)
    meta = {"hyperparameters": {k: best[k] for k in ("min_df", "max_features", "C", "class_weight")},
            "ngram_range": [1, 3], "tfidf": "sublinear tf, smooth idf, l2 norm",
            "classifier": "LogisticRegression lbfgs multinomial",
            "eval_macro_f1": {s: round(best[s], 4) for s in EVAL}, "train": {s: len(sets[s][0]) for s in TRAIN},
            "files": {FILES[s]: sha256(data / FILES[s])[:16] for s in TRAIN + EVAL},
            "ewect_map": EWECT_MAP, "sklearn": sklearn.__version__, "script": "scripts/fit_labeller.py"}
    export(vec, clf, args.out, meta, LABELS)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, vocabulary {len(vec.vocabulary_)})", flush=True)

    # 3. the numpy labeller agrees with scikit-learn
    ng = NgramLabeller(args.out)
    ev_x = [t for s in EVAL for t in sets[s][0]]
    xe = vec.transform(ev_x)
    read = np.diff(xe.indptr) > 0  # texts with no known n-gram are neutral by rule, not softmax(intercept)
    diff = np.abs(ng.probs(ev_x) - clf.predict_proba(xe))[read].max()
    print(f"numpy vs scikit-learn predict_proba on the {int(read.sum())} eval texts with a known n-gram: "
          f"max |diff| {diff:.2e} (float32 parameters); {int((~read).sum())} without one are neutral", flush=True)

    # 4. SnowNLP: scores once, thresholds tuned on eval
    lex = LexiconLabeller()
    snow = {}
    t0 = time.time()
    for s in EVAL + TEST:
        snow[s] = lex.scores(raw[s][0])
    print(f"snownlp scored {sum(len(v) for v in snow.values())} texts in {time.time() - t0:.0f}s", flush=True)
    keep_mask = {s: np.array([g is not None for g in raw[s][1]]) for s in FILES}

    def snow_pred(s, lo, hi):
        x = snow[s][keep_mask[s]]
        return np.where(x < lo, 0, np.where(x > hi, 2, 1))

    cuts = np.round(np.arange(0.05, 0.96, 0.05), 2)
    tuned = max(((lo, hi) for lo in cuts for hi in cuts if lo <= hi),
                key=lambda c: np.mean([scores(sets[s][1], snow_pred(s, *c), classes3)[0] for s in EVAL]))
    tuned_eval = {s: scores(sets[s][1], snow_pred(s, *tuned), classes3)[0] for s in EVAL}
    print(f"snownlp thresholds tuned on eval: {tuned} (eval macro-F1 "
          + " ".join(f"{s} {v:.4f}" for s, v in tuned_eval.items()) + ")")

    # 5. the test table
    results = {"chosen": best, "grid": grid, "snownlp_tuned_thresholds": list(tuned), "tests": {}}
    print(f"\n### Test files (95% bootstrap intervals, {args.boot} resamples over texts)\n")
    print("| test file | n | labeller | macro-F1 [95% CI] | accuracy [95% CI] |")
    print("|---|---|---|---|---|")
    diffs = []
    shares = []
    seen = {normalize_weibo(t) for t in tr_x}
    units = []  # (row label, file, mask over its kept texts or None)
    for s in TEST:
        unseen = np.array([normalize_weibo(t) not in seen for t in sets[s][0]])
        units.append((s, s, None))
        if not unseen.all():
            units.append((f"{s}, texts not in train ({int(unseen.sum())})", s, unseen))
    for s_label, s, mask in units:
        x, y = sets[s]
        pr = ng.probs(x)
        s_default, s_tuned = snow_pred(s, 1 / 3, 2 / 3), snow_pred(s, *tuned)
        sb = snow[s][keep_mask[s]]
        if mask is not None:
            x, y, pr, s_default, s_tuned, sb = [x[i] for i in np.flatnonzero(mask)], y[mask], pr[mask], \
                s_default[mask], s_tuned[mask], sb[mask]
        preds = {"snownlp (1/3, 2/3)": s_default, f"snownlp tuned ({tuned[0]:g}, {tuned[1]:g})": s_tuned,
                 "ngram": pr.argmax(-1)}
        binary = s.startswith("weibo2018/")
        views = [("3-class", classes3, preds)]
        if binary:  # gold is negative/positive only
            views = [("neutral counted wrong", (0, 2), preds),
                     ("binary P(pos) vs P(neg)", (0, 2), {"snownlp (s > 1/2)": np.where(sb > 0.5, 2, 0),
                                                         "ngram": np.where(pr[:, 2] > pr[:, 0], 2, 0)})]
        for view, classes, pv in views:
            b = bootstrap(y, pv, classes, args.boot)
            for name, r in b.items():
                lab = name if not binary else f"{name}, {view}"
                f_lo, f_hi = ci(r["f1_boot"])
                a_lo, a_hi = ci(r["acc_boot"])
                print(f"| {s_label} | {len(y)} | {lab} | {r['f1']:.3f} [{f_lo:.3f}, {f_hi:.3f}] | "
                      f"{r['acc']:.3f} [{a_lo:.3f}, {a_hi:.3f}] |")
                results["tests"].setdefault(s_label, {})[lab] = {
                    "macro_f1": r["f1"], "macro_f1_ci": [f_lo, f_hi], "accuracy": r["acc"], "accuracy_ci": [a_lo, a_hi],
                    "n": len(y)}
            names = list(b)
            d = b[names[-1]]["f1_boot"] - b[names[0]]["f1_boot"]
            diffs.append((s_label + ("" if not binary else f", {view}"), names[-1], names[0],
                          b[names[-1]]["f1"] - b[names[0]]["f1"], *ci(d)))
        if mask is None:
            gold_share = np.bincount(y, minlength=3) / len(y)
            shares.append((s, gold_share, {n: np.bincount(p, minlength=3) / len(y) for n, p in preds.items()}))
    print("\n### Paired difference in macro-F1 (same resamples)\n")
    print("| test file | difference | macro-F1 difference [95% CI] |")
    print("|---|---|---|")
    for s, a, b_, d, lo, hi in diffs:
        print(f"| {s} | {a} - {b_} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
        results.setdefault("paired", []).append({"test": s, "a": a, "b": b_, "diff": d, "ci": [lo, hi]})
    print("\n### Class shares (negative / neutral / positive): gold vs each labeller\n")
    print("| test file | gold | " + " | ".join(shares[0][2]) + " |")
    print("|---|---|" + "---|" * len(shares[0][2]))
    for s, g, per in shares:
        fmt = lambda v: " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
        print(f"| {s} | {fmt(g)} | " + " | ".join(fmt(v) for v in per.values()) + " |")
    # surprise texts (left out of the scores): where each labeller puts them
    print("\n### EWECT 'surprise' texts (not scored): share labelled negative / neutral / positive\n")
    print("| test file | n | snownlp (1/3, 2/3) | ngram |")
    print("|---|---|---|---|")
    for s in ("ewect/usual_test", "ewect/virus_test"):
        sx = [t for t, o in zip(raw[s][0], raw[s][2]) if o == "surprise"]
        sp = np.bincount(np.digitize(lex.scores(sx), [1 / 3, 2 / 3 + 1e-12]), minlength=3) / len(sx)
        npd = np.bincount(ng.probs(sx).argmax(-1), minlength=3) / len(sx)
        print(f"| {s} | {len(sx)} | {' / '.join(f'{v:.2f}' for v in sp)} | {' / '.join(f'{v:.2f}' for v in npd)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
