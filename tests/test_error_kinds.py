"""README's list of error kinds is the Literal mypy checks, which is what the code produces."""

from __future__ import annotations

import re
from pathlib import Path

from shadowproxy.base.error_kinds import ERROR_KINDS


def test_readme_lists_exactly_the_error_kinds() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Error kinds", 1)[1].split("\n#", 1)[0]
    bullets = "\n".join(line for line in section.splitlines() if line.startswith(("- ", "  ")))
    documented = re.findall(r"`([a-z_0-9]+)`", bullets)
    assert sorted(documented) == sorted(ERROR_KINDS)
