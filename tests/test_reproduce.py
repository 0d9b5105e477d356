"""gaisnet-reproduce's verdicts: bit-identical on the reference's foundation, otherwise within
(or outside) the reference's spread over seeds; and the committed reference is sound."""

from __future__ import annotations

import json

from gaisnet_flwr.experiments.reproduce import REFERENCE, across_cpus, compare, spread

REF = {
    "seeds": {"0": {"before": 0.21, "after": 0.60, "foundation-sha256": "aaaa"}},
    "spread": {"before": 0.15, "after": 0.05},
}


def run(before: float, after: float, digest: str) -> dict[str, object]:
    return {"before": before, "after": after, "foundation-sha256": digest}


def test_the_same_foundation_must_give_the_same_numbers() -> None:
    ok, line = compare("0", run(0.21, 0.60, "aaaa"), REF)
    assert ok and line.endswith("bit-identical")
    ok, line = compare("0", run(0.21, 0.6025, "aaaa"), REF)  # one test image off
    assert not ok and "DIFFERENT although the foundation is the same" in line


def test_another_foundation_is_judged_by_the_spread_over_seeds() -> None:
    ok, line = compare("0", run(0.255, 0.6325, "bbbb"), REF)  # the README's earlier machine
    assert ok and "another foundation" in line and "within the spread" in line
    ok, line = compare("0", run(0.21, 0.66, "bbbb"), REF)
    assert not ok and "OUTSIDE the spread" in line
    ok, line = compare("7", run(0.21, 0.60, "aaaa"), REF)
    assert not ok and "no reference" in line


def test_the_committed_reference_is_its_own_runs_spread() -> None:
    reference = json.loads(REFERENCE.read_text())
    assert len(reference["seeds"]) >= 5
    assert reference["spread"] == spread(reference["seeds"])
    assert len({s["foundation-sha256"] for s in reference["seeds"].values()}) == 1


def test_across_cpus_is_the_largest_move_of_a_seed_by_another_foundation() -> None:
    other = {
        "seeds": {
            "0": {"before": 0.28, "after": 0.62, "foundation-sha256": "bbbb"},
            "9": {"before": 0.90, "after": 0.90, "foundation-sha256": "bbbb"},  # not in REF
        }
    }
    width = across_cpus(REF, [other])
    assert width["foundations"] == ["bbbb"]
    assert abs(width["before"] - 0.07) < 1e-9 and abs(width["after"] - 0.02) < 1e-9
    # with it, another foundation is judged by what other CPUs did to the seed
    reference = {**REF, "across-cpus": width}
    ok, line = compare("0", run(0.21, 0.615, "cccc"), reference)
    assert ok and "what other CPUs' foundations moved a seed" in line
    assert not compare("0", run(0.21, 0.63, "cccc"), reference)[0]
