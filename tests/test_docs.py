"""The docs cannot drift: the generated reference equals the code, links resolve, results name their commands."""

import argparse
import pathlib
import re

import pytest

from nopejax import cli, config, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("name", sorted(reference.PAGES))
def test_generated_reference_is_current(name):
    text = (DOCS / "reference" / name).read_text()
    assert text == reference.PAGES[name](), f"docs/reference/{name} is out of date: run python -m nopejax.reference"


@pytest.mark.parametrize("name", sorted(reference.SPANS))
def test_generated_family_lists_are_current(name):
    """The README's family list and the HF guide's table are generated from nopejax/hf/registry.py."""
    text = (ROOT / name).read_text()
    assert reference.with_span(text, reference.SPANS[name]) == text, (
        f"{name} is out of date: run python -m nopejax.reference"
    )


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def test_every_config_key_has_a_meaning_and_a_row():
    keys = _leaves(config.base_config().to_dict())  # independent of reference.leaf_keys
    assert set(reference.FIELD_DOCS) - keys == set(), "FIELD_DOCS names keys base_config() does not have"
    assert keys - set(reference.FIELD_DOCS) == set(), "base_config() keys without a line in FIELD_DOCS"
    assert all(doc.strip() for doc in reference.FIELD_DOCS.values())
    rows = re.findall(r"^\| `([^`]+)` \|", (DOCS / "reference" / "config.md").read_text(), re.M)
    assert sorted(rows) == sorted(keys)


def test_every_command_and_flag_is_in_the_cli_reference():
    text = (DOCS / "reference" / "cli.md").read_text()
    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, parser in sub.choices.items():
        assert f"## `nopejax {name}" in text
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in ("-h", "--help") or f"`{flag}`" in text, (name, flag)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = page.parent / target if target else page
        assert path.exists(), f"{page.relative_to(ROOT)} links to missing {target}"
        if anchor:
            assert anchor in _anchors(path), f"{page.relative_to(ROOT)} links to missing {target}#{anchor}"


def _anchors(path: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_results_table_names_command_date_machine_versions():
    pages = sorted((DOCS / "results").glob("*.md"))
    assert pages
    for page in pages:
        for section in re.split(r"^## ", page.read_text(), flags=re.M)[1:]:
            if not re.search(r"^\|.*\|$", section, re.M):
                continue
            title = section.splitlines()[0]
            for field in ("Command", "Date", "Machine", "Versions"):
                assert re.search(rf"^- {field}: \S", section, re.M), f"{page.name}, {title!r}: no '- {field}:' line"
