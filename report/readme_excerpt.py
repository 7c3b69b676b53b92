"""README.md's results excerpt, generated: the header and first rows of the paper table (results/tables/paper.md) written between two
marker lines of README.md, so the front page shows what the committed table says, never a pasted copy.

    python -m report.readme_excerpt            # rewrite the block (make demo runs it after the report)
    python -m report.readme_excerpt --check    # exit 1 if the block differs from what the table gives

Only the text between the markers changes; a README without both markers, or a table file without a markdown table,
is refused in one line (exit 2)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
TABLE = REPO_ROOT / "results" / "tables" / "paper.md"
BEGIN = "<!-- paper-excerpt: written by `python -m report.readme_excerpt` from results/tables/paper.md; do not edit -->"
END = "<!-- /paper-excerpt -->"
ROWS = 6


class ExcerptError(ValueError):
    pass


def first_table(table_md: str) -> tuple[str | None, list[str]]:
    """The heading above the first markdown table (or None) and the table's lines (header, rule, rows)."""
    heading, lines = None, []
    for line in table_md.splitlines():
        if line.startswith("|"):
            lines.append(line.rstrip())
        elif lines:
            break
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    if len(lines) < 2:
        raise ExcerptError("no markdown table (a header and its |---| rule) in the table file")
    return heading, lines


def block(table_md: str, rows: int = ROWS, source: str = "results/tables/paper.md") -> str:
    """The lines between the markers: a caption, the table's header and rule, its first `rows` data rows."""
    heading, lines = first_table(table_md)
    data = lines[2:]
    shown = data[:rows]
    caption = f"{heading}: " if heading else ""
    more = f"first {len(shown)} of {len(data)} rows" if len(data) > len(shown) else f"all {len(data)} rows"
    return "\n".join([f"*{caption}{more} of `{source}` (the notes are there; also as `.csv` and `.tex`).*",
                      "", *lines[:2], *shown])


def rewrite(readme: str, table_md: str, rows: int = ROWS) -> str:
    """`readme` with the text between BEGIN and END replaced by block(table_md)."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < 0 or end < start:
        raise ExcerptError(f"README.md needs the marker lines {BEGIN!r} and {END!r}, in that order")
    head = readme[:start + len(BEGIN)]
    return f"{head}\n{block(table_md, rows)}\n{readme[end:]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m report.readme_excerpt", description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--table", type=Path, default=TABLE)
    ap.add_argument("--rows", type=int, default=ROWS, help=f"data rows shown (default {ROWS})")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the README's block is stale")
    a = ap.parse_args(argv)
    try:
        old = a.readme.read_text(encoding="utf-8")
        new = rewrite(old, a.table.read_text(encoding="utf-8"), a.rows)
    except (OSError, ExcerptError) as e:
        print(f"error: readme excerpt: {e}", file=sys.stderr)
        return 2
    if a.check:
        if new != old:
            print(f"{a.readme}: the excerpt differs from {a.table}; run python -m report.readme_excerpt", file=sys.stderr)
            return 1
        return 0
    if new != old:
        tmp = a.readme.with_name(f".{a.readme.name}.tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(a.readme)  # atomic: a killed demo never leaves half a README
        print(f"README excerpt: {a.readme} rewritten from {a.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
