"""The README's set-up commands are the ones CI runs and the ones that exist."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands():
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [b.split("\n```")[0].strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    main_cmd, test_cmd = commands()
    assert "dvc repro" in main_cmd and "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci


def test_readme_mentions_every_stage_and_the_benchmarks_page_every_bench():
    text = (ROOT / "README.md").read_text()
    for stage in (ROOT / "stages").glob("*.py"):
        if stage.stem != "__init__":
            assert f"stages.{stage.stem}" in text, stage.stem
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
