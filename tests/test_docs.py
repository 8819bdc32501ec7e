"""The README and docs/ point at things that exist, and the config reference is the code's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)")
PATH = re.compile(r"`((?:dalle2|steps|pipelines|scripts|benchmarks|configs|tests)/[\w/.-]+)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors (lower case, punctuation dropped, spaces to '-'), plus ids."""
    text = page.read_text()
    heads = re.findall(r"^#+ (.+)$", text, flags=re.M)
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}
    return slugs | set(re.findall(r'<a id="([^"]+)"', text))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    for target, anchor in LINK.findall(page.read_text()):
        if "://" in target:
            continue
        path = (page.parent / target).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page.name}: {target} has no heading #{anchor}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_project_path_named_exists(page: Path) -> None:
    for name in PATH.findall(page.read_text()):
        path = name.split("::")[0].rstrip(".")
        assert (ROOT / path).exists() or list(ROOT.glob(path)), f"{page.name} names {name}"


def test_the_config_reference_is_generated_from_the_code() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/config_reference.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_reference_lists_every_key_of_the_config() -> None:
    from dalle2.config import DataConfig, TrainConfig, UnclipConfig

    page = (ROOT / "docs" / "configuration.md").read_text()
    for name in TrainConfig.model_fields:
        assert f"`decoder[i].train.{name}`" in page
    for name in DataConfig.model_fields:
        assert f"`data.{name}`" in page
    for name in UnclipConfig.model_fields:
        assert f"`{name}`" in page


def test_the_front_page_stays_short() -> None:
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 220, f"README.md has {lines} lines; move detail into docs/"
