"""`llamaforge reproduce RUN`: rerun a training run from its model card alone, after checking that
its data files still have the SHA-256 the card recorded, and compare the final metrics."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import LlamaforgeError
from ..provenance.modelcard import read_card, sha256
from .recipes import recipe


def same_metrics(a, b, rel: float = 1e-6) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_metrics(a[k], b[k], rel) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if a != a and b != b:   # NaN in both
            return True
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)
    return a == b


def reproduce(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Rerun a run from its model card alone (after checking its data files' SHA-256) and
    compare the final metrics: {"match", "original", "reproduced", "out"}."""
    prov = read_card(run_dir)
    for f in prov.get("data", []):
        if not Path(f["path"]).is_file():
            raise LlamaforgeError(f"{f['path']}: training data named by the card is missing")
        if sha256(f["path"]) != f["sha256"]:
            raise LlamaforgeError(f"{f['path']}: SHA-256 differs from the card's: the data changed since the run")
    cls, run = recipe(prov["recipe"])
    if prov["config"].get("max_minutes"):
        print("llamaforge: warning: the run was bounded by --max-minutes; a rerun on a machine of another speed "
              "takes another number of steps, and its metrics will differ", file=sys.stderr)
    config = dict(prov["config"], out=str(out or f"{Path(run_dir)}-reproduced"))
    try:
        cfg = cls(**config)
    except TypeError as e:
        raise LlamaforgeError(f"{run_dir}/README.md: the card's config does not fit this llamaforge ({e})") from None
    final = json.loads(json.dumps(run(cfg)))   # as the card stores it
    return {"match": same_metrics(prov["metrics"], final), "original": prov["metrics"], "reproduced": final,
            "out": config["out"]}
