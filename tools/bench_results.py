"""Where the GPU tools write their results: `<out>/<gpu>-<date>-<label>.json`."""

from __future__ import annotations

import json
import re
from pathlib import Path


def write_results(results: dict, out_dir: Path) -> Path:
    """`results` (with its `gpu`, `date` and `label`) as JSON; written again after each
    case, so a run cut short keeps what it measured."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", results["gpu"]).strip("-").lower()
    path = out_dir / f"{gpu}-{results['date']}-{results['label']}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return path
