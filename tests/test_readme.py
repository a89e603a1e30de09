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


def test_readme_mentions_every_stage_and_bench():
    text = (ROOT / "README.md").read_text()
    for stage in (ROOT / "stages").glob("*.py"):
        if stage.stem != "__init__":
            assert f"stages.{stage.stem}" in text, stage.stem
    for bench in ("bench/sampling.py --quick", "bench/reverse.py --quick"):
        assert bench in text
