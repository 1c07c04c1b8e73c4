"""What the measurement scripts share: the figures printed as JSON, and a copy kept where asked."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def emit(result: dict, json_out: Optional[str] = None) -> int:
    """Print ``result`` as indented JSON (stdout), write the same text to ``json_out`` when given; returns 0."""
    text = json.dumps(result, indent=1)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n")
    return 0
