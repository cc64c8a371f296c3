"""Write sample_data/corpus.json: paragraphs of Python's bundled documentation.

The text comes from ``pydoc_data.topics`` (part of CPython, PSF License
Agreement); sample_data/CORPUS_LICENSE.md records the licence and the Python
version it was taken from, since the topics change between Python releases.

Rules: topics in sorted key order; heading underlines removed; each topic split
into paragraphs at blank lines; whitespace runs (newlines, indentation) collapsed
to one space; paragraphs shorter than 40 characters (headings, one-word lines)
dropped; exact duplicates dropped (first kept), so a held-out split never sees a
training copy.

Usage: python scripts/make_sample_corpus.py [--out sample_data/corpus.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from pydoc_data.topics import topics

MIN_CHARS = 40
MAX_FILE_BYTES = 1_500_000
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_WHITESPACE = re.compile(r"\s+")
# reStructuredText heading underlines ("*****", "=====") are layout, not prose.
_UNDERLINE = re.compile(r"^[ \t]*([*=~^#-])\1{2,}[ \t]*$", re.MULTILINE)

LICENSE_NOTE = """\
# sample_data/corpus.json: origin and licence

`corpus.json` is a JSON list of {n_paragraphs} paragraphs ({n_chars} characters)
taken from `pydoc_data.topics` of Python {python_version}, the help texts bundled
with CPython, written by `scripts/make_sample_corpus.py` (topics in sorted
order, heading underlines removed, split at blank lines, whitespace collapsed,
paragraphs under {min_chars} characters and exact duplicates dropped).

The Python documentation is Copyright (c) 2001 Python Software Foundation;
All Rights Reserved, and is distributed under the PSF License Agreement
(https://docs.python.org/3/license.html). The paragraphs are reproduced
unchanged apart from whitespace.
"""


def sample_paragraphs() -> list[str]:
    """Whitespace-normalised, de-duplicated paragraphs of every pydoc topic."""
    seen: set[str] = set()
    paragraphs: list[str] = []
    for key in sorted(topics):
        for block in _BLANK_LINE.split(_UNDERLINE.sub("", topics[key])):
            paragraph = _WHITESPACE.sub(" ", block).strip()
            if len(paragraph) < MIN_CHARS or paragraph in seen:
                continue
            seen.add(paragraph)
            paragraphs.append(paragraph)
    return paragraphs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("sample_data/corpus.json"))
    args = parser.parse_args(argv)

    paragraphs = sample_paragraphs()
    # One paragraph per line keeps diffs readable; ensure_ascii=False keeps it small.
    text = "[\n" + ",\n".join(json.dumps(p, ensure_ascii=False) for p in paragraphs) + "\n]\n"
    size = len(text.encode("utf-8"))
    if size > MAX_FILE_BYTES:
        print(f"corpus would be {size} bytes, over the {MAX_FILE_BYTES} limit", file=sys.stderr)
        return 1
    n_chars = sum(len(p) for p in paragraphs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.out)  # atomic: never leave a half-written corpus behind
    version = ".".join(str(v) for v in sys.version_info[:3])
    (args.out.parent / "CORPUS_LICENSE.md").write_text(
        LICENSE_NOTE.format(
            n_paragraphs=len(paragraphs),
            n_chars=n_chars,
            python_version=version,
            min_chars=MIN_CHARS,
        ),
        encoding="utf-8",
    )
    print(f"wrote {args.out}: {len(paragraphs)} paragraphs, {n_chars} characters, {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
