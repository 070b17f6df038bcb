"""What verifying a token cache costs at WikiText-103 size: the sha256 of each id file on every load.

Writes a WikiText-103-sized train split (103,227,021 ids as uint32, its vocabulary of 267,735 words needs 32
bits) into a temp folder, then times what `deqlm.data.corpus` does on each load: the checksum of the file
(`sha256_file`) and, for comparison, the scan for out-of-vocabulary ids the loader always made. Prints JSON.

    python scripts/cache_verify_cost.py [--tokens N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from deqlm.data.corpus import sha256_file

WT103_TRAIN_TOKENS = 103_227_021


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=WT103_TRAIN_TOKENS)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.bin"
        rng = np.random.default_rng(0)
        rng.integers(0, 267_735, size=args.tokens, dtype=np.uint32).tofile(path)
        ids = np.memmap(path, dtype=np.uint32, mode="r", shape=(args.tokens,))
        sha_s = _best_of(lambda: sha256_file(path), args.repeats)
        max_s = _best_of(lambda: int(ids.max()), args.repeats)
        size = path.stat().st_size
    print(json.dumps({"tokens": args.tokens, "bytes": size, "sha256_s": round(sha_s, 3),
                      "sha256_gb_per_s": round(size / sha_s / 1e9, 2), "max_scan_s": round(max_s, 3),
                      "repeats": args.repeats, "note": "best of repeats, file in the page cache"}))


if __name__ == "__main__":
    main()
