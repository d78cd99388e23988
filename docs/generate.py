"""Write the generated parts of docs/ (the config reference, the metrics columns) from their one definition in the
code; `python docs/generate.py --check` fails when a page is stale (tests/test_docs.py runs it)."""

from __future__ import annotations

import sys
from pathlib import Path

from workers.core.config import config_reference
from workers.core.metrics import columns_markdown

DOCS = Path(__file__).resolve().parent
START, END = "<!-- generated: start -->\n", "<!-- generated: end -->\n"
GENERATED = {"config.md": config_reference, "metrics.md": columns_markdown}


def regenerate(page: Path, table: str) -> str:
    text = page.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}{table}{END}{tail}"


def main(argv: list[str]) -> int:
    stale = []
    for name, make in GENERATED.items():
        page = DOCS / name
        text = regenerate(page, make())
        if text != page.read_text():
            stale.append(name)
            if "--check" not in argv:
                page.write_text(text)
    if stale and "--check" in argv:
        print(f"stale: {', '.join(stale)}: run `python docs/generate.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
