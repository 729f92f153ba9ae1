"""Replace (or append) one marked section of a Markdown file; the benchmark scripts' writer."""

from __future__ import annotations

from pathlib import Path


def write_section(doc: Path, marker: str, lines: list[str]) -> None:
    """Put `lines` between `<!-- marker:begin -->` and `<!-- marker:end -->` in `doc`,
    replacing what was there, or append the section if the markers are missing."""
    begin_mark, end_mark = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    section = "\n".join([begin_mark, *lines, end_mark])
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    begin, end = text.find(begin_mark), text.find(end_mark)
    if begin >= 0 and end > begin:
        text = text[:begin] + section + text[end + len(end_mark) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)
