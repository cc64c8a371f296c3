"""A huge single document with a small --max-tokens: time and peak memory of the real
`saetui collect --headless` on the embedded model (the first version tokenised the whole
50 MB text: 494 s and ~9-10 GB RSS for 300 tokens).

    python benchmarks/bench_corpus.py [--mb 50]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=50.0, help="size of the document")
    parser.add_argument("--max-tokens", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        words = (REPO / "sample_data" / "corpus.json").read_text().split()
        text, size = [], 0
        while size < args.mb * 1e6:
            text.extend(words)
            size += sum(len(w) + 1 for w in words)
        corpus = Path(tmp) / "huge.json"
        corpus.write_text(json.dumps([" ".join(text)]))
        print(f"document: {corpus.stat().st_size / 1e6:.1f} MB in one JSON string")
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "saetui", "collect", "--headless", "--data", str(corpus),
             "--sae", str(REPO / "sample_data" / "sae"), "--out", str(Path(tmp) / "index"),
             "--max-tokens", str(args.max_tokens), "--metrics-tokens", "256", "--device", "cpu"],
            capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:])
            return 1
        print(
            f"collect --max-tokens {args.max_tokens}: {seconds:.1f} s wall, "
            f"peak RSS {peak_mb:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
