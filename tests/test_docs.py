"""The README is a landing page that starts with the quickstart, and every relative link in it and
in docs/ resolves."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"(?m)^#+ (.+)$", page.read_text())
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_the_first_screen_is_the_quickstart() -> None:
    first = "\n".join((REPO / "README.md").read_text().splitlines()[:40])
    assert "bash scripts/run.sh" in first and "bash scripts/test.sh" in first
    assert ".ci/run" in first and "docs/run-summary.png" in first


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: {target}"


# -- figures in docs equal the committed outputs they came from ---------------------------------
def tables(page: Path, heading: str) -> list[list[list[str]]]:
    """The Markdown tables under `## heading` (up to the next `## `), each as rows of cells,
    header and separator rows left out."""
    text = page.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    found: list[list[list[str]]] = []
    block: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip("|").split("|")])
        elif block:
            found.append(block[2:])
            block = []
    return found


def rows_of(path: Path, table: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["table"] == table]


def seconds(value: str) -> str:
    return f"{float(value):.1f} s"


def test_the_planner_figures_in_measured_md_are_the_committed_benchmark() -> None:
    """docs/measured.md's planner tables equal docs/planner/*.csv, which
    `python scripts/bench_planner.py --csv docs/planner/bench_planner.csv --edge-csv
    docs/planner/bench_edge.csv` wrote (output in docs/planner/bench_planner.txt)."""
    measured = REPO / "docs" / "measured.md"
    planner = REPO / "docs" / "planner"
    (comm,) = tables(
        measured, "Clusters from a device population, and the communication-aware planner"
    )
    assert [row[2:] for row in comm] == [
        [f"{seconds(r['busiest_minmax_s'])} ({r['plan_minmax']})",
         f"{seconds(r['busiest_comm_aware_s'])} ({r['plan_comm_aware']})",
         f"{float(r['ratio']):.3f}"]
        for r in rows_of(planner / "bench_planner.csv", "cluster")
    ]  # fmt: skip
    single, shared = tables(measured, "The edge server as a cooperative node")
    edge = planner / "bench_edge.csv"
    assert single == [
        [f"{float(r['bandwidth_mhz']):g} MHz", seconds(r["busiest_devices_s"]),
         seconds(r["latency_devices_s"]), r["plan_devices"], seconds(r["busiest_edge_s"]),
         seconds(r["latency_edge_s"]), r["plan_edge"]]
        for r in rows_of(edge, "edge-cluster")
    ]  # fmt: skip
    assert shared == [
        [f"{float(r['bandwidth_mhz']):g} MHz", f"{r['offload']} of {r['clusters']}",
         *(seconds(r[k]) for k in ("busiest_devices_s", "busiest_edge_s", "latency_devices_s",
                                   "latency_edge_s", "busiest_best_set_s", "latency_best_set_s"))]
        for r in rows_of(edge, "edge-round")
    ]  # fmt: skip
    # and the benchmark's text output is the run that wrote them
    text = (planner / "bench_planner.txt").read_text()
    assert (
        "rows: docs/planner/bench_planner.csv" in text
        and "rows: docs/planner/bench_edge.csv" in text
    )
    for r in rows_of(edge, "edge-cluster"):
        busiest, latency = float(r["busiest_edge_s"]), float(r["latency_edge_s"])
        assert f"{busiest:.1f} s {latency:7.1f} s {r['plan_edge']}" in text


def test_the_readme_is_a_landing_page() -> None:
    # What it is, the two commands, what you get, where to go next (issue 26): measurement
    # narrative belongs in docs/, where each page links back.
    words = len((REPO / "README.md").read_text().split())
    assert words < 1000, f"README.md has {words} words; move detail into a docs/ page"


def test_the_hierarchy_lab_figures_in_deploy_md_are_its_committed_output() -> None:
    """docs/deploy.md's figures for `gaisnet-lab run --edges 2` are the run's output
    (docs/lab-hierarchy/output.txt) and its cloud's metrics.csv."""
    text = " ".join((REPO / "docs" / "deploy.md").read_text().split())
    lab = REPO / "docs" / "lab-hierarchy"
    out = (lab / "output.txt").read_text()
    up = re.search(r"\[lab\] up in (\d+) s", out)
    total = re.search(r"completed in (\d+) s", out)
    rounds = re.findall(r"cloud round (\d) \(edge rounds [\d-]+\): (\d+) s, 2 edge\(s\) "
                        r"contributed, accuracy ([\d.]+)", out)  # fmt: skip
    assert up and total and len(rounds) == 2
    assert f"came up in {up.group(1)} s and completed in {total.group(1)} s" in text
    (_, t1, a1), (_, t2, a2) = rounds
    assert f"cloud round 1 took {t1} s" in text and f"cloud round 2 {t2} s" in text
    assert f"{a1} after cloud round 1, {a2} after round 2" in text
    with open(lab / "cloud-metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [f"{float(r['accuracy']):.4f}" for r in rows] == [a1, a2]
    assert [f"{float(r['round-time-s']):.0f}" for r in rows] == [t1, t2]
