"""Every "docs/<page>.md §N" that code and tests cite names a section that exists in docs/."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"docs/(\w+)\.md\s*(?:#\s*)?§\s*(\d+)(?:\.(\d+))?")


def sections(page: Path):
    """{"4": {"4", "4.6", ...}}: numbered headings, and numbered list items inside a section."""
    found, current = set(), None
    for line in page.read_text().splitlines():
        m = re.match(r"^(#{2,3}) (\d+)(?:\.(\d+))?[. ]", line)
        if m:
            current = m.group(2)
            found.add(m.group(2) if m.group(3) is None else f"{m.group(2)}.{m.group(3)}")
            continue
        m = re.match(r"^(\d+)\. ", line)
        if m and current:
            found.add(f"{current}.{m.group(1)}")
    return found


def test_every_cited_section_exists():
    cited = []
    for path in [*ROOT.glob("prores_megatron/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("examples/scripts/*")]:
        text = path.read_text(errors="replace")
        for m in CITE.finditer(text):
            cited.append((path.relative_to(ROOT), m.group(1), m.group(2) if m.group(3) is None else f"{m.group(2)}.{m.group(3)}"))
    assert len(cited) > 30  # the code does cite the docs
    known = {page.stem: sections(page) for page in (ROOT / "docs").glob("*.md")}
    missing = [c for c in cited if c[2] not in known.get(c[1], set())]
    assert not missing, missing
