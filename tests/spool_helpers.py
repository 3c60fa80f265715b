"""A stand-in for the Python the spool writer process runs on, to inject faults
into the real child program (mailgate.spoolchild)."""

from __future__ import annotations

import sys
from pathlib import Path


def stand_in_python(directory: Path, name: str, fault: str) -> str:
    """Write an executable "python" that runs the real spool writer program after
    ``fault`` (Python source: it may patch ``os`` or ``spoolfiles``); return its path.
    The writer calls it as ``python -I -c CODE ROOT TMP MESSAGES``."""
    script = directory / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import errno, os, sys\n"
        "root, tmp, messages = sys.argv[4:7]\n"
        "sys.path.insert(0, root)\n"
        "from mailgate import spoolchild, spoolfiles\n"
        f"{fault}\n"
        "sys.exit(spoolchild.main([tmp, messages]))\n"
    )
    script.chmod(0o755)
    return str(script)
