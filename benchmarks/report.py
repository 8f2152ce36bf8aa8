"""The benchmark scripts' JSON output (no JAX import: ``reference_torch`` uses it too)."""

from __future__ import annotations

import json


def emit(results: dict, output: str | None = None) -> str:
    """Prints ``results`` as indented JSON with sorted keys and, if ``output`` is given,
    writes the same text to that file; returns the text."""
    text = json.dumps(results, indent=1, sort_keys=True)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    return text
