"""Results files: JSON written to a temporary path and renamed into place, so that a crash never leaves
half a file."""

from __future__ import annotations

import json
import os


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
