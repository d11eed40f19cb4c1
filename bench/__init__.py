"""Ponder's benchmarks: each module is a `ponder bench` subcommand (bench/cli.py)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, res: dict) -> Path:
    """A bench's result as indented JSON (its folder made); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=2) + "\n")
    return p
