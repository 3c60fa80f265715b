"""README.rst is the user's manual (and the package's long description): it must
render without a single docutils warning, or a table silently turns into an
error block on PyPI and in every viewer."""

from __future__ import annotations

from pathlib import Path

import docutils.core
import docutils.utils

README = Path(__file__).resolve().parent.parent / "README.rst"


def test_readme_renders_without_warnings() -> None:
    docutils.core.publish_doctree(
        README.read_text(encoding="utf-8"),
        source_path=str(README),
        settings_overrides={"halt_level": docutils.utils.Reporter.WARNING_LEVEL, "report_level": 5},
    )
