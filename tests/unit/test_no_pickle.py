"""Nothing in safeloop pickles or unpickles: safetensors and JSON only."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "safeloop"
FORBIDDEN = re.compile(
    r"torch\.load\(|\bimport pickle\b|\bfrom pickle\b|weights_only\s*=\s*False|\bcPickle\b|\bdill\b"
)


def test_no_source_file_in_the_package_loads_or_imports_pickle():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if FORBIDDEN.search(line)
    ]
    assert len(list(PACKAGE.rglob("*.py"))) > 10  # the scan did look at the package
    assert offenders == []
