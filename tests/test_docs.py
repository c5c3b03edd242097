"""The documentation: generated reference pages that match the code, a site that builds with no warning,
and a README whose links lead somewhere."""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gen_reference():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sections(page: str) -> dict[str, str]:
    """The page's ``## name`` sections by name."""
    parts = re.split(r"^## (\S+).*$", page, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_page_has_every_subcommand_and_option():
    from facegender.cli import build_parser

    parser = build_parser()
    gen = _gen_reference()
    sections = _sections(gen.cli_markdown(parser))
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert commands and set(commands) == set(sections)
    for name, sub in commands.items():
        rows = [line for line in sections[name].splitlines() if line.startswith("| `")]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            names = action.option_strings or [action.metavar or action.dest]
            for option in names:
                assert any(f"`{option}" in row for row in rows), f"facegender {name} {option}: not in the CLI page"
            described = " ".join(gen.help_text(action).split()).replace("|", "\\|")
            if described:
                assert any(described in row for row in rows), \
                    f"facegender {name} {names[0]}: its help text is not in the CLI page"


def test_http_page_has_every_route_and_parameter():
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    gen = _gen_reference()
    document = gen.openapi_document()
    page = gen.http_markdown(document)
    operations = [(path, method, op) for path, item in document["paths"].items() for method, op in item.items()]
    assert {path for path, _, _ in operations} >= {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz"}
    for path, method, op in operations:
        assert f"## {method.upper()} `{path}`" in page
        for parameter in op.get("parameters", []):
            assert f"| `{parameter['name']}` |" in page, f"{path}: parameter {parameter['name']} not in the page"
        for status in op.get("responses", {}):
            assert f"| {status} |" in page


def test_site_builds_with_no_warning(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must build the docs: install mkdocs, mkdocs-material and mkdocstrings[python]")
        pytest.skip("mkdocs is not installed (pip install mkdocs mkdocs-material 'mkdocstrings[python]')")
    site = tmp_path / "site"
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    cli = (site / "reference" / "cli.html").read_text(encoding="utf-8")
    assert "--min-confidence" in cli and "--max-upload-mb" in cli
    assert "Classifier" in (site / "reference" / "python.html").read_text(encoding="utf-8")
    assert "/v1/predict/batch" in (site / "reference" / "http.html").read_text(encoding="utf-8")
    assert "fonts.googleapis.com" not in (site / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["README.md", "MODEL_CARD.md"])
def test_front_pages_link_to_files_that_exist(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"{name} links to files that do not exist: {missing}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; guides and studies belong in docs/"
