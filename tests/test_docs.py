"""Every ``docs/...`` file the code, the tests and the README cite exists, with the section a citation names
(``docs/algorithm.md "Stage B"``): a heading whose text is the cited text, or starts with it and a colon."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"""docs/([\w./-]+?\.md)(?:\s*(?:"([^"\n]+)"|'([^'\n]+)'))?""")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
OLD_NOTES = re.compile(r"\b(?:ALGORITHM|ARCHITECTURE|CHECKPOINTS|COMFYUI|STYLE|TOYWORLD)\.md\b")


def cited_files() -> list[Path]:
    files = [ROOT / "README.md", *ROOT.glob("*.py"), *(ROOT / "docs").rglob("*.md")]
    for folder in ("flash_core", "nodes", "training", "tests", "benchmarks", "web"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".js")]
    return sorted(files)


def citations() -> list[tuple[Path, str, str | None]]:
    found = []
    for path in cited_files():
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            found.append((path, match[1], match[2] or match[3]))
    return found


def headings(doc: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return HEADING.findall(text)


def has_section(titles: list[str], section: str) -> bool:
    return any(title == section or title.startswith(section + ":") for title in titles)


def test_the_code_cites_the_docs():
    cited = {name for _, name, _ in citations()}
    assert {"algorithm.md", "checkpoints.md", "comfyui.md", "toyworld.md", "architecture.md"} <= cited


def test_every_cited_file_and_section_exists():
    problems = []
    for path, name, section in citations():
        doc = ROOT / "docs" / name
        where = path.relative_to(ROOT)
        if not doc.is_file():
            problems.append(f"{where}: docs/{name} does not exist")
        elif section is not None and not has_section(headings(doc), section):
            problems.append(f'{where}: docs/{name} has no section "{section}"')
    assert not problems, "\n".join(sorted(set(problems)))


def test_no_citation_of_notes_outside_the_repository():
    for path in cited_files():
        match = OLD_NOTES.search(path.read_text(encoding="utf-8"))
        assert match is None, f"{path.relative_to(ROOT)} cites {match[0]}, which is not in the repository"


def test_section_matching():
    titles = ["Stage B: DMD with timestep sharing", "VAE"]
    assert has_section(titles, "Stage B") and has_section(titles, "VAE")
    assert not has_section(titles, "Stage") and not has_section(titles, "DMD")
