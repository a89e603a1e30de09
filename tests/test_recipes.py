"""docs/recipes.md is the reviewed recipe of every paper profile: each listed value, with its source. A profile that
drifts from the table (or a table row naming a key the profile does not have) fails here."""

import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from flowback.params import Params, load_params

ROW = re.compile(r"^\| `(?P<key>[^`]+)` \| `(?P<value>[^`]*)` \| (?P<source>.+) \|$")


def recipe_tables(text: str) -> dict[str, list[tuple[str, object, str]]]:
    """{profile file: [(key, value, source), ...]} from the doc's `## profiles/<name>.yaml` sections."""
    tables, current = {}, None
    for line in text.splitlines():
        if line.startswith("## profiles/"):
            current = line[3:].strip()
            tables[current] = []
        elif current and (m := ROW.match(line)):
            tables[current].append((m["key"], yaml.safe_load(m["value"]), m["source"].strip()))
    return tables


def lookup(params: Params, key: str):
    """A row's key: `section.key` of the profile, or `@experiment section.key` of that experiment's merged run."""
    if key.startswith("@"):
        name, key = key[1:].split(" ", 1)
        params = params.run(params.resolve_run(name)).params
    node = params
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    if hasattr(node, "model_dump"):
        node = node.model_dump(mode="json")
    return list(node) if isinstance(node, tuple) else node


def disagreements(profile: Path, rows) -> list[str]:
    params = load_params(profile)
    out = []
    for key, want, _ in rows:
        try:
            have = lookup(params, key)
        except (AttributeError, KeyError) as e:
            out.append(f"{key}: not in the profile ({e})")
            continue
        if have != want and not (isinstance(have, float) and isinstance(want, (int, float)) and have == float(want)):
            out.append(f"{key}: profile {have!r}, docs/recipes.md {want!r}")
    return out


@pytest.fixture(scope="module")
def tables():
    return recipe_tables((ROOT / "docs" / "recipes.md").read_text())


def test_every_paper_profile_has_a_recipe_table_with_a_source_per_row(tables):
    paper = {"profiles/imagenet64.yaml", "profiles/imagenet64_1m.yaml", "profiles/imagenet256.yaml",
             "profiles/starflow256.yaml", "profiles/af256.yaml"}
    assert paper <= set(tables)
    for profile in paper:
        assert len(tables[profile]) >= 20, profile
        assert all(source for _, _, source in tables[profile]), profile


@pytest.mark.parametrize("profile", ["imagenet64", "imagenet64_1m", "imagenet256", "starflow256", "af256"])
def test_the_profile_holds_every_value_of_its_recipe_table(tables, profile):
    assert disagreements(ROOT / "profiles" / f"{profile}.yaml", tables[f"profiles/{profile}.yaml"]) == []


def test_r_repa_profiles_take_the_papers_values(tables):
    """The values issue 21 names, read through the table (so they cannot drift apart)."""
    rows = {k: v for k, v, _ in tables["profiles/imagenet64.yaml"]}
    assert rows["model.patch_size"] == 4 and rows["model.width"] == 1024 and rows["align.weight"] == 0.1
    assert rows["align.projector_dim"] == 1024 and rows["train.ema_decay"] == 0.9999
    rows256 = {k: v for k, v, _ in tables["profiles/imagenet256.yaml"]}
    assert rows256["model.pos_embed"] == "rope" and rows256["model.mlp"] == "swiglu" and rows256["model.width"] == 1024


@pytest.mark.parametrize("edit", [("model", "width", 768), ("align", "weight", 0.5), ("train", "ema_decay", 0.0)])
def test_an_edited_profile_value_is_caught(tables, tmp_path, edit):
    """The conformance check can fail: one value of imagenet64.yaml changed in a copy."""
    section, key, value = edit
    raw = yaml.safe_load((ROOT / "profiles" / "imagenet64.yaml").read_text())
    raw[section][key] = value
    copy = tmp_path / "imagenet64.yaml"
    copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    found = disagreements(copy, tables["profiles/imagenet64.yaml"])
    want = dict((k, v) for k, v, _ in tables["profiles/imagenet64.yaml"])[f"{section}.{key}"]
    assert f"{section}.{key}: profile {value!r}, docs/recipes.md {want!r}" in found
    assert all(value != want and f"profile {value!r}" in line for line in found)  # nothing else is reported
