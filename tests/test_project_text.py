"""The project's own text: current, self-contained, and about the project alone.

- no development history (numbered rounds of work, issue numbers, the developers' machines) in
  any tracked file (`scripts/check_history.py`);
- the results tables in README.md and docs/results.md are generated from the result
  files under docs/results/ (`scripts/results_report.py`);
- every relative link in the README and docs/ points at a file inside the repository.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_history  # noqa: E402
import results_report  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_no_development_history_in_tracked_files():
    found = check_history.findings(check_history.tracked_files([]))
    assert not found, "\n".join(found)


def test_the_history_check_finds_what_it_is_for(tmp_path):
    text = tmp_path / "notes.md"
    text.write_text(
        "Fine: a round of 8 votes, issues are welcome, one session's data.\n"
        "Measured in sess" + "ion 28.\n"
        "See iss" + "ue 3 for why.\n"
        "on our d" + "ev CPU\n"
    )
    found = check_history.findings([text])
    assert [line.split(": ")[1] for line in found] == [
        "a numbered round of work",
        "an issue number",
        "a machine of the developers",
    ]


def test_results_tables_are_generated_from_the_result_files():
    for path, text in results_report.rendered().items():
        assert path.read_text() == text, f"run: python scripts/results_report.py ({path.name})"


def test_the_results_table_covers_every_task_and_method():
    table = results_report.tables()[results_report.TABLE]
    for task in results_report.TASKS:
        for method in ("base model", "gesal", "LoRA r=8"):
            assert re.search(rf"^\| {task} \| {re.escape(method)} \| (?!not run)", table, re.M)


def test_doc_links_stay_inside_the_repository():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor on the same page
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_doc_sections_named_in_the_code_exist():
    """Code comments point at docs by section name (`docs/learning.md, "Settling"`): each
    name must be a heading of that doc."""
    cited = re.compile(r'(docs/[\w-]+\.md)[,:]?\s*\(?"([A-Z][^"]+)"')
    missing = []
    for path in check_history.tracked_files([]):
        if path.suffix not in {".py", ".md", ".sh", ".yml", ".yaml", ".toml"}:
            continue
        for doc, wrapped in cited.findall(path.read_text(errors="replace")):
            section = re.sub(r"\s*\n\s*#?\s*", " ", wrapped)  # a name wrapped in a comment
            text = (ROOT / doc).read_text() if (ROOT / doc).exists() else ""
            if section not in re.findall(r"^#+\s+(.+?)\s*$", text, re.M):
                missing.append(f"{path.relative_to(ROOT)}: {doc}, {section!r}")
    assert not missing, missing
