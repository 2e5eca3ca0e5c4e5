"""Crash recovery, many rounds: POST /images, kill -9 the server at a random moment, restart,
and check every acknowledged image is there and the index agrees with SQLite.

The same rounds as tests/test_durability.py, more of them (see its docstring for why the count
matters), on a fresh empty collection in a temporary folder. From the repository root:

    python -m benchmarks.crash_recovery --model BUNDLE [--rounds 50] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from index.gallery import GalleryIndex
from models.bundle import Bundle
from tests.test_durability import crash_rounds


def main() -> None:
    """Run the rounds and print what was checked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, metavar="BUNDLE")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bundle = Bundle.load(args.model, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "index"
        GalleryIndex.create(bundle.embedding_dim, bundle.fingerprint, index_dir).close()
        start = time.monotonic()
        acknowledged = crash_rounds(args.model, index_dir, args.rounds, args.seed)
        print(
            f"{args.rounds} kill -9 rounds in {time.monotonic() - start:.0f} s: all "
            f"{acknowledged} acknowledged images present, index consistent with SQLite"
        )


if __name__ == "__main__":
    main()
