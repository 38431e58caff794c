"""Model cards and provenance: every model llamaforge writes carries a README.md in the Hugging Face
format, whose front matter also holds what `llamaforge reproduce` (train/reproduce.py) needs to run
it again (recipe, resolved config, data files with their SHA-256); and the licence checks before
training or export.

Front matter: license (inherited from the base model), base_model, datasets, metrics, tags,
library_name, and a `llamaforge:` block. Body: the base model's licence and the duties it passes
on, the data, the config, seed, versions, the command line and the final metrics.
"""
from __future__ import annotations

import hashlib
import sys
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..errors import LlamaforgeError
from ..files import atomic_write_text, read_front_matter
from .command import command_line
from .openness import identify_licence, knowledge, report

# The Hugging Face Hub's licence tags for the licences in openness.yaml.
HF_LICENSE_TAGS = {"apache-2.0": "apache-2.0", "mit": "mit", "cc-by-4.0": "cc-by-4.0", "cc-by-sa-4.0": "cc-by-sa-4.0",
                   "cc-by-nc-4.0": "cc-by-nc-4.0", "openrail-m": "openrail", "llama-2": "llama2", "llama-3": "llama3",
                   "llama-3.1": "llama3.1", "llama-3.2": "llama3.2", "gemma": "gemma"}
DUTY_KINDS = ("naming_attribution", "redistribution", "acceptable_use", "output_training", "user_cap", "field_of_use",
              "commercial_use")


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_terms(base_model: str | None) -> dict | None:
    """The openness report of the base model (None when there is none: trained from scratch)."""
    if not base_model:
        return None
    try:
        return report(base_model)
    except LlamaforgeError as e:   # the terms are advice: never a reason to stop a run
        print(f"llamaforge: could not read the base model's licence terms ({e})", file=sys.stderr)
        return None


def check_licence(base_model: str | None, out) -> dict | None:
    """Before a run: the base model's terms (for the card), with a warning for what the run
    would break."""
    terms = base_terms(base_model)
    warn(licence_warnings(terms, out))
    return terms


def licence_warnings(terms: dict | None, out: str | Path, license_tag: str | None = None) -> list[str]:
    """What a derived model at `out` (optionally tagged with `license_tag`) would break."""
    if not terms or not terms["license"]["id"]:
        return []
    lid, name = terms["license"]["id"], terms["license"]["name"]
    warnings = []
    prefix = {"llama-3": "llama-3", "llama-3.1": "llama", "llama-3.2": "llama"}.get(lid)
    if prefix and not Path(out).name.lower().replace(" ", "-").replace("_", "-").startswith(prefix):
        warnings.append(f"{name} requires a distributed derivative's name to begin with "
                        f"\"{'Llama 3' if lid == 'llama-3' else 'Llama'}\"; {Path(out).name!r} does not")
    if license_tag and license_tag != HF_LICENSE_TAGS.get(lid, lid):
        tagged = knowledge()["licences"].get(identify_licence(license_tag) or "", {})
        if terms.get("commercial_use") is False and tagged.get("commercial_use", True):
            warnings.append(f"the base model's {name} forbids commercial use, but the output is tagged {license_tag!r}")
        elif not tagged or tagged.get("osi_approved") and not terms["license"]["osi_approved"]:
            warnings.append(f"the output is tagged {license_tag!r}, but it derives from a model under {name}, whose "
                            f"terms still apply to it")
    return warnings


def warn(warnings: list[str]):
    for w in warnings:
        print(f"llamaforge: licence warning: {w}", file=sys.stderr)


def write_model_card(out_dir: str | Path, *, recipe: str, title: str, base_model: str | None, config: dict,
                     data: list[str], metrics: dict, tags: list[str] = (), library: str = "llamaforge",
                     license_tag: str | None = None, terms: dict | None = None, filename: str = "README.md"):
    """README.md (or `filename`) for a model directory (a run, its best model, an export)."""
    import yaml

    terms = terms if terms is not None else base_terms(base_model)
    lid = terms["license"]["id"] if terms else None
    tag = license_tag or (HF_LICENSE_TAGS.get(lid, "other") if terms else "other")
    files = [{"path": str(Path(f).resolve()), "sha256": sha256(f)} for f in data if f and Path(f).is_file()]
    front = {"license": tag}
    if tag == "other" and terms and terms["license"]["name"]:
        front.update(license_name=lid, license_link=terms["license"]["url"])
    if base_model:
        front["base_model"] = base_model
    front.update(datasets=[Path(f["path"]).name for f in files], metrics=sorted(_metric_names(metrics)),
                 tags=["llamaforge", recipe, *tags], library_name=library,
                 llamaforge={"recipe": recipe, "version": __version__, "torch": metadata.version("torch"),
                             "command": command_line(), "seed": config.get("seed"), "config": config, "data": files,
                             "metrics": metrics})
    lines = [f"# {title}", "", f"Made with [llamaforge](https://github.com/llamaforge) (`{recipe}`)."]
    lines += ["", "## Base model and licence", ""]
    if not base_model:
        lines.append("Trained from scratch by this run: no base model; the licence is its author's to choose.")
    elif not terms or not lid:
        lines.append(f"Base model: `{base_model}`. No licence was found for it: check its terms before use.")
    else:
        lines.append(f"Base model: `{base_model}`, under **{terms['license']['name']}** ({terms['license']['url']}). "
                     f"This model derives from it, and its terms pass on:")
        duties = [r for r in terms["restrictions"] if r["kind"] in DUTY_KINDS]
        lines += [f"- {r['kind'].replace('_', ' ')} ({r['clause']}): {r['detail']}" for r in duties] or ["- none beyond the licence text"]
        lines.append(f"\nOpenness of the base (`llamaforge openness`): {terms['verdict']}.")
    lines += ["", "## Training data", ""]
    lines += [f"- `{f['path']}` — SHA-256 `{f['sha256']}`" for f in files] or ["- none recorded"]
    lines += ["", "## How it was made", "", f"- command: `{command_line()}`", f"- seed: {config.get('seed')}",
              f"- llamaforge {__version__}, torch {metadata.version('torch')}", "", "Resolved config:", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip(), "```",
              "", "Reproduce: `llamaforge reproduce RUN_DIR` reruns it from this card and compares the metrics.",
              "", "## Metrics", "", "```json", _json(metrics), "```", ""]
    text = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n" + "\n".join(lines)
    atomic_write_text(Path(out_dir) / filename, text)


def _json(x) -> str:
    import json
    return json.dumps(x, indent=2, ensure_ascii=False)


def _metric_names(metrics: dict, prefix: str = "") -> set[str]:
    names = set()
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            names.add(k)
        elif isinstance(v, dict) and k not in ("per_class",):
            names |= _metric_names(v)
    return names


def read_card(run_dir: str | Path) -> dict:
    """The `llamaforge:` block of a run's model card."""
    card = Path(run_dir) / "README.md"
    if not card.exists():
        raise LlamaforgeError(f"{card}: no model card, so nothing to reproduce from")
    front = read_front_matter(card)
    if not isinstance(front.get("llamaforge"), dict):
        raise LlamaforgeError(f"{card}: no llamaforge provenance in the front matter")
    return front["llamaforge"]


def write_run_cards(out: Path, recipe: str, cfg, data: list, metrics: dict, tags: list[str] = (),
                    terms: dict | None = None):
    """The model card of a run, in the run directory and in its best model."""
    from dataclasses import asdict
    base = getattr(cfg, "model", None)
    library = "peft" if getattr(cfg, "method", None) in ("lora", "adalora") else "llamaforge"
    for d in (out, out / "best"):
        if d.is_dir():
            write_model_card(d, recipe=recipe, title=f"{out.name} ({recipe}, llamaforge)", base_model=base,
                             config=asdict(cfg), data=data, metrics=metrics, tags=tags, library=library, terms=terms)
