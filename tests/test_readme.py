"""The README's set-up commands are the ones CI runs and the ones that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands():
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [b.split("\n```")[0].strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    main_cmd, test_cmd = commands()
    assert ("snakemake" in main_cmd or "dvc repro" in main_cmd) and "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci


def test_readme_mentions_every_stage_and_the_benchmarks_page_every_bench():
    text = (ROOT / "README.md").read_text()
    for stage in (ROOT / "flowback" / "stages").glob("*.py"):
        if stage.stem != "__init__":
            assert f"| {stage.stem} |" in text, stage.stem  # a row of the README's stage table
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "docs/benchmarks.md" in text
    for bench in (ROOT / "bench").glob("*.py"):
        if bench.stem != "measure":  # the shared timing helper, not a benchmark
            assert f"bench/{bench.name}" in benchmarks, bench.name


def test_readme_is_a_front_door_and_its_links_exist():
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for path in set(re.findall(r"\b(docs/[\w\-]+\.md|results/[\w/\-]+\.(?:png|md))\b", text)):
        assert (ROOT / path).exists(), path


def test_the_readme_results_table_is_the_committed_one():
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Experiment "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    table = (ROOT / "results" / "tables" / "ablation.md").read_text().splitlines()
    assert len(rows) > 3 and [row for row in rows if row not in table] == []


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end > 0 else None]


COMPARATIVE = re.compile(r"\b(lower|higher|better|worse|beats?|below|above|outperforms?|wins?)\b", re.IGNORECASE)


def test_what_it_shows_states_only_comparisons_the_committed_results_support():
    """The README's claims about the default run are the table's generated comparison lines (Welch's test over the
    committed seeds), verbatim; no other sentence there compares two experiments."""
    table = (ROOT / "results" / "tables" / "ablation.md").read_text()
    generated = [line for line in section(table, "## Compared with the baseline").splitlines() if line.startswith("- ")]
    shows = section((ROOT / "README.md").read_text(), "## What the default run shows")
    quoted = [line for line in shows.splitlines() if line.startswith("- ") and " vs " in line and "seeds)" in line]
    assert generated and quoted == generated
    names = re.findall(r"^\| (\w+)\s+\|", table, re.MULTILINE)
    prose = " ".join(line for line in shows.splitlines() if line not in quoted and not line.startswith("|"))
    for sentence in re.split(r"(?<=[.;:])\s+", prose):
        mentioned = [n for n in names if re.search(rf"\b{re.escape(n)}\b", sentence)]
        assert not (COMPARATIVE.search(sentence) and len(mentioned) >= 1), sentence
