"""The quality numbers the project publishes (README.md, docs/benchmarks.md §5, the CPU demo's summary)
come from the data in benchmarks/results/ and rest on at least 8 seeds (the claim rule,
docs/benchmarks.md §5).

Each interval is recomputed here from the stored per-seed differences with the Student-t formula
written out (scipy's t quantile, not the benchmark's own helper), and the strings the documents print
are looked up in them: a number edited by hand, or data replaced without the documents, fails."""

import json
import math
import statistics
from pathlib import Path

import pytest
from scipy.stats import t as student_t

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
BENCH = json.loads((RESULTS / "bench_depth.json").read_text())
CONFIRM = json.loads((RESULTS / "confirm" / "summary.json").read_text())  # the unseen-seed reruns
README = (ROOT / "README.md").read_text()
DOC = (ROOT / "docs" / "benchmarks.md").read_text()
DEMO_DEPTH = 48  # examples/scripts/demo_cpu.sh's NUM_LAYERS default


def interval(deltas):
    n = len(deltas)
    half = student_t.ppf(0.975, n - 1) * statistics.stdev(deltas) / math.sqrt(n)
    return statistics.fmean(deltas), half, n


def test_every_published_row_rests_on_at_least_8_seeds():
    rows = BENCH["rows"] + BENCH.get("pooled", [])
    assert rows
    for row in rows:
        assert len(row["seeds"]) == len(set(row["seeds"])) == len(row["deltas"]) >= 8, row["depth"]


def test_the_demo_depth_is_measured_and_pooled():
    assert DEMO_DEPTH in {r["depth"] for r in BENCH["rows"]}
    assert DEMO_DEPTH in {r["depth"] for r in BENCH["pooled"]}


@pytest.mark.parametrize("row", BENCH["rows"] + BENCH["pooled"],
                         ids=[f"{r['depth']}-layers-{len(r['seeds'])}-seeds" for r in BENCH["rows"] + BENCH["pooled"]])
def test_stored_interval_matches_its_seeds_and_the_documents(row):
    m, h, n = interval(row["deltas"])
    assert row["delta"][0] == pytest.approx(m, abs=1e-12) and row["delta"][1] == pytest.approx(h, rel=1e-9)
    assert row["delta"][2] == n
    quoted = f"{m:+.3f} ± {h:.3f}"
    assert quoted in DOC, f"docs/benchmarks.md does not quote {row['depth']} layers, {n} seeds: {quoted}"
    if row["depth"] == DEMO_DEPTH and row in BENCH["pooled"]:
        assert quoted in README, f"README.md does not quote the demo's pooled row {quoted}"


def test_pooled_rows_contain_the_fresh_sweep():
    fresh = {r["depth"]: r for r in BENCH["rows"]}
    for row in BENCH["pooled"]:
        mine = dict(zip(row["seeds"], row["deltas"]))
        for seed, delta in zip(fresh[row["depth"]]["seeds"], fresh[row["depth"]]["deltas"]):
            assert mine[seed] == delta


def test_every_relative_link_in_the_documents_resolves():
    """The figures and reports the documents point to are in the repository (a moved result folder fails)."""
    import re

    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")) and not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not missing, missing


@pytest.mark.parametrize("row", CONFIRM["rows"], ids=[f"{r['depth']}-layers-unseen" for r in CONFIRM["rows"]])
def test_confirmation_rows_are_unseen_and_quoted(row):
    """The confirmation's seeds are new to the main sweep and to the first study; its figures are the published ones."""
    fresh = next(r for r in BENCH["rows"] if r["depth"] == row["depth"])
    pooled = next(r for r in BENCH["pooled"] if r["depth"] == row["depth"])
    assert len(row["seeds"]) >= 8 and not set(row["seeds"]) & (set(fresh["seeds"]) | set(pooled["seeds"]))
    assert CONFIRM["settings"] == BENCH["settings"]
    m, h, _ = interval(row["deltas"])
    assert row["delta"][0] == pytest.approx(m, abs=1e-12) and row["delta"][1] == pytest.approx(h, rel=1e-9)
    assert f"{m:+.3f} ± {h:.3f}" in DOC
