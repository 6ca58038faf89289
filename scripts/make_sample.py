"""Regenerate (or verify) the bundled synthetic sample: python scripts/make_sample.py [--check]."""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from socialalign_jax.data.sample import DEFAULT_SEED, SAMPLE_DIR, write_sample  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=SAMPLE_DIR, help="output directory (default: the bundled one)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--check", action="store_true", help="only verify that --out matches a fresh generation")
    args = ap.parse_args(argv)
    if not args.check:
        paths = write_sample(args.out, args.seed)
        print(f"wrote {len(paths)} event files to {args.out / 'events'}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_sample(tmp, args.seed)
        for p in fresh + [Path(tmp) / "README.md"]:
            rel = p.relative_to(tmp)
            if not (args.out / rel).exists() or (args.out / rel).read_bytes() != p.read_bytes():
                print(f"{args.out / rel}: differs from a fresh generation with seed {args.seed}", file=sys.stderr)
                return 1
    print(f"{args.out}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
