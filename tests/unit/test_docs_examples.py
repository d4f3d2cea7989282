"""Examples the docs show are the shipped files they name: a YAML block in docs/studies.md that names a
shipped study equals that study's file (comments aside)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
STUDIES = ROOT / "src" / "hld" / "configs" / "studies"


def test_the_study_yaml_example_is_the_shipped_study_it_names():
    text = (ROOT / "docs" / "studies.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    named = [b for b in blocks if isinstance(b, dict) and (STUDIES / f"{b.get('name')}.yaml").exists()]
    assert named, "docs/studies.md shows no YAML block naming a shipped study"
    for block in named:
        assert block == yaml.safe_load((STUDIES / f"{block['name']}.yaml").read_text()), block["name"]
