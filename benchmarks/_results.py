"""Shared by the benchmark scripts: replace one section of benchmarks/RESULTS.md in place.

Each benchmark owns a section delimited by ``<!-- name:start -->`` / ``<!-- name:end -->``; other sections
are kept.  The file is re-read just before writing (several benchmarks share it) and replaced atomically.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def update_section(path: Path, section: str, name: str) -> None:
    """Put ``section`` (which starts and ends with the markers of ``name``) in place of the old one, or append."""
    start, end = markers(name)
    if not (section.lstrip().startswith(start) and section.rstrip().endswith(end)):
        raise ValueError(f"section must start with {start} and end with {end}")
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section.strip(), text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text.rstrip() + "\n")
    os.replace(tmp, path)
