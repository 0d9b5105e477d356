"""The figures README.md and docs/ quote agree with the committed outputs they come from, and
each of those outputs says what made it (docs/figures.toml lists them).

An entry is one figure: the `page`, the `text` as the page has it with `{}` where the figure
stands, the `source` file (CSV: `rows`, a list of dicts of numbers where they parse; JSON:
`data`), the Python expression `expr` that computes the figure from it (`files("docs/x/*.json")`
reads more of them) and the `format` spec that writes it; or, for a quoted line, `quote`: text
that must appear verbatim in the page and in the source (a log). Every source's folder holds a
provenance.json with the command, commit, packages, CPU, threads and load
(gaisnet_flwr/experiments/provenance.py), unless the entry says why not (`no-provenance`).
"""

from __future__ import annotations

import csv
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
FIGURES = tomllib.loads((REPO / "docs" / "figures.toml").read_text())["figure"]
PROVENANCE_KEYS = {"command", "commit", "packages", "cpu", "torch-threads", "load-average-start"}


def number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def load(source: Path) -> dict[str, Any]:
    if source.suffix == ".csv":
        with source.open(newline="") as f:
            return {"rows": [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]}
    if source.suffix == ".json":
        return {"data": json.loads(source.read_text())}
    return {"text": source.read_text()}


def files(pattern: str) -> list[Any]:
    """The committed JSON files matching `pattern` (relative to the repository), parsed."""
    return [json.loads(path.read_text()) for path in sorted(REPO.glob(pattern))]


def flat(text: str) -> str:
    """Markdown wraps lines: compare with runs of white space as one space."""
    return " ".join(text.split())


def ids(entry: dict[str, Any]) -> str:
    return f"{entry['page']}: {entry.get('text') or entry.get('quote', '')}"[:80]


@pytest.mark.parametrize("entry", FIGURES, ids=ids)
def test_the_page_quotes_its_source(entry: dict[str, Any]) -> None:
    page = flat((REPO / entry["page"]).read_text())
    source = REPO / entry["source"]
    assert source.is_file(), f"{entry['source']} is not committed"
    if "quote" in entry:
        quote = flat(entry["quote"])
        assert quote in page, f"{entry['page']} no longer quotes: {quote}"
        assert quote in flat(source.read_text()), f"{entry['source']} does not hold: {quote}"
        return
    # `files(pattern)`: more committed JSONs, for a figure taken over several of them
    helpers = {"json": json, "math": math, "re": re, "files": lambda pattern: files(pattern)}
    # one namespace: comprehensions in `expr` see `rows` / `data` / `text` too
    value = eval(entry["expr"], {**helpers, **load(source)})  # noqa: S307 - our own file
    expected = entry["text"].replace("{}", format(value, entry["format"]))
    assert flat(expected) in page, f"{entry['page']} should say: {expected}"


# A source without provenance.json (made before that file existed, or by hand): its entries say
# why with `no-provenance = "..."`, and the page must say where and when it was made.
@pytest.mark.parametrize(
    "source", sorted({e["source"] for e in FIGURES if "no-provenance" not in e})
)
def test_every_source_says_what_made_it(source: str) -> None:
    record = REPO / source
    provenance = record.parent / "provenance.json"
    assert provenance.is_file(), f"{source}: no provenance.json beside it"
    made = json.loads(provenance.read_text())
    assert set(made) >= PROVENANCE_KEYS, sorted(PROVENANCE_KEYS - set(made))
    assert made["commit"] and "+changes" not in made["commit"], (
        f"{provenance}: made from uncommitted code ({made['commit']!r})"
    )
