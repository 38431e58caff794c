"""`llamaforge openness MODEL`: how open a model really is.

It reads metadata only (GGUF key/values, config.json, the model card's front matter, LICENSE /
USE_POLICY files, a run's config), identifies the licence and the model family against the
knowledge in `openness.yaml` (each fact with its source and the date it was checked), and reports
the licence's terms point by point, what the family has published, the Model Openness Framework
class, whether it meets the OSI Open Source AI Definition, and a one-sentence verdict.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from ..errors import LlamaforgeError
from ..files import read_front_matter, read_json, read_yaml
from ..formats.gguf_header import read_gguf
from ..formats.paths import adapter_config, model_kind, resolve_model_path

VERDICTS = ("open-source", "open-weights-restricted", "not-open", "unknown")
COMPONENTS = ("weights", "inference_code", "training_code", "training_data", "data_recipe", "tokenizer",
              "evaluation", "technical_report", "intermediate_checkpoints")
# Model Openness Framework classes, cumulative (LF AI & Data, arXiv 2403.13784), in terms of the
# components above: Class III needs the architecture (inference code), final weights, report,
# evaluation results and a data card; II adds training and evaluation code; I adds the data,
# its processing and intermediate checkpoints.
MOF = (("Class III", ("inference_code", "weights", "technical_report", "evaluation", "data_recipe")),
       ("Class II", ("training_code",)),
       ("Class I", ("training_data", "intermediate_checkpoints")))
# Restriction kinds that take away "use for any purpose without asking permission" (OSAID).
USE_LIMITS = ("commercial_use", "user_cap", "acceptable_use", "field_of_use", "output_training")
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "USE_POLICY.md")


@lru_cache(maxsize=1)
def knowledge() -> dict:
    return read_yaml(Path(__file__).parent / "openness.yaml")


# --- what the files say ---------------------------------------------------------------------------

def hub_cache_name(path: Path) -> str | None:
    """"ORG/NAME" of a path inside the Hugging Face hub's cache (`models--ORG--NAME/snapshots/HASH/`),
    where the directory's own name is a commit hash that says nothing."""
    for part in reversed(path.resolve().parts):
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return None


def gather(path: Path) -> dict:
    """{"format", "names": [...], "licences": [(text, where)], "notes": [...], "base": path or None}.
    Names, most telling first: what the files call the model, the hub cache's repository name,
    the directory or file name; apart, the architecture (a weaker hint: Qwen2 and Qwen2.5 share one,
    and their licences differ by size)."""
    names, licences, notes = [], [], []
    cached = hub_cache_name(path)
    if cached:
        names.append(cached)
    fmt = model_kind(path)
    if fmt == "gguf":
        meta = read_gguf(path)[0]
        for key in ("general.name", "general.basename", "general.finetune"):
            if isinstance(meta.get(key), str):
                names.append(meta[key])
        if meta.get("general.basename") and meta.get("general.size_label"):
            names.append(f"{meta['general.basename']}-{meta['general.size_label']}")
        i = 0
        while f"general.base_model.{i}.name" in meta:
            names.append(str(meta[f"general.base_model.{i}.name"]))
            i += 1
        for key in ("general.license", "general.license.name"):
            if isinstance(meta.get(key), str):
                licences.append((meta[key], f"GGUF {key}"))
        return {"format": fmt, "names": names + [path.stem], "licences": licences, "notes": notes, "base": None}

    if fmt == "run":
        cfg = read_yaml(path / "config.yaml")
        base = cfg.get("model")
        if not base:   # not judged by the directory's name: "tinyllama-scratch" is no TinyLlama
            notes.append(f"{path}: trained from scratch; its licence is whatever its author gives it")
        return {"format": "run", "names": [], "licences": [], "notes": notes, "base": base}
    if fmt == "adapter":
        base = adapter_config(path)[2].get("base_model_name_or_path")
        return {"format": "adapter", "names": [path.name], "licences": [], "notes": notes, "base": base}
    architecture = []
    if fmt == "hf":
        cfg = read_json(path / "config.json")
        if isinstance(cfg.get("_name_or_path"), str):
            names.append(cfg["_name_or_path"])
        architecture = [str(a) for a in [*(cfg.get("architectures") or []), cfg.get("model_type")]
                        if isinstance(a, str) and a != "llama" and not a.startswith("Llama")]
    card = path / "README.md"
    if card.exists():
        try:
            front = read_front_matter(card)
        except LlamaforgeError as e:   # a malformed card is a finding, not a failure
            notes.append(str(e))
            front = {}
        lic = front.get("license")
        if lic == "other" or (lic is None and front.get("license_name")):
            lic = front.get("license_name") or lic
        if isinstance(lic, list):
            lic = lic[0] if lic else None
        if lic:
            licences.append((str(lic), "README.md front matter (license)"))
        for key in ("model_name", "base_model"):
            value = front.get(key)
            names += [str(v) for v in (value if isinstance(value, list) else [value]) if v]
    for name in LICENSE_FILES:
        f = path / name
        if f.exists():
            licences.append((f.read_text(encoding="utf-8", errors="replace")[:3000], name))
    return {"format": fmt, "names": names + [path.resolve().name], "architecture": architecture, "licences": licences,
            "notes": notes, "base": None}


def _mentions(text: str, phrase: str) -> bool:
    """`phrase` in `text` as whole words ("mit license" is not in "submit license")."""
    return re.search(r"(?<![a-z0-9])" + re.escape(phrase) + r"(?![a-z0-9])", text) is not None


@lru_cache(maxsize=1)
def _licence_phrases() -> list[tuple[str, str]]:
    """(phrase, licence id), longest first: "llama 3.1 community license" before "llama3",
    "cc-by-nc-4.0" before "cc-by-4.0"."""
    kb = knowledge()["licences"]
    return sorted(((m, lid) for lid, lic in kb.items() for m in lic.get("match", [])), key=lambda p: -len(p[0]))


def identify_licence(text: str) -> str | None:
    """The knowledge base's id for a licence named (or written out) in `text`. A licence file is
    judged by its title (first lines) before its body, which may mention other licences."""
    kb = knowledge()["licences"]
    t = " ".join(text.lower().split())
    if t in kb:
        return t
    for part in (t[:300], t) if len(t) > 300 else (t,):
        for m, lid in _licence_phrases():
            if _mentions(part, m):
                return lid
    return None


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[\s_\-/.:]+", text.lower()) if t]


def identify_family(names: list[str]) -> str | None:
    """The first family (in the knowledge base's order, specific before general) whose pattern is
    a run of whole tokens of one of the names: "llama-3" is in "Meta-Llama-3-8B" but not in
    "llama-30b"."""
    named = [_tokens(n) for n in names]
    for fid, fam in knowledge()["families"].items():
        for pattern in fam["match"]:
            p = _tokens(pattern)
            if any(toks[i:i + len(p)] == p for toks in named for i in range(len(toks) - len(p) + 1)):
                return fid
    return None


# --- the report -----------------------------------------------------------------------------------

def mof_class(licence: dict | None, published: dict) -> str:
    if licence is None:
        return "unknown"
    if not (licence.get("osi_approved") or licence.get("open_content")):
        return "none"   # MOF requires open licences on every component
    reached = "none"
    for cls, parts in MOF:
        states = [published.get(p, "unknown") for p in parts]
        if any(s is False for s in states):
            return reached
        if any(s == "unknown" for s in states):
            return reached if reached != "none" else "unknown"
        reached = cls
    return reached


def osaid(licence: dict | None, published: dict, lang: str = "en") -> dict:
    reasons, unknown = [], []
    if licence is None:
        unknown.append(say("no licence identified", lang))
    else:
        if not (licence.get("osi_approved") or licence.get("open_content")):
            reasons.append(say("not OSI-approved", lang, licence=licence["name"]))
        limits = sorted({r["kind"] for r in licence.get("restrictions", []) if r["kind"] in USE_LIMITS})
        if limits:
            reasons.append(say("use is restricted", lang, limits=LIST_SEP[lang].join(kind_name(k, lang) for k in limits)))
    for part, need in (("weights", "parameters"), ("training_code", "complete training code"),
                       ("inference_code", "inference code"), ("data_recipe", "data information")):
        state = published.get(part, "unknown")
        if state is False:
            reasons.append(say("not published", lang, need=say(need, lang)))
        elif state == "unknown":
            unknown.append(say("unknown whether published", lang, need=say(need, lang)))
    meets = "fails" if reasons else "unknown" if unknown else "meets"
    return {"meets": meets, "reasons": reasons or unknown}


def restrictiveness(lid: str) -> tuple:
    """Order for reading conflicting licence claims the safe way: no commercial use first, then
    not open, then the number of use limits."""
    lic = knowledge()["licences"][lid]
    limits = sum(r["kind"] in USE_LIMITS for r in lic.get("restrictions", []))
    return (lic.get("commercial_use") is False, not (lic.get("osi_approved") or lic.get("open_content")), limits)


def report(model: str = "default", base_depth: int = 0, lang: str = "en") -> dict:
    """The openness report of a model file or directory (see the module docstring); its reasons in
    `lang` (en, zh); its notes and conflicts are in English."""
    path = resolve_model_path(model)
    found = gather(path)
    notes = list(found["notes"])
    if found["base"] and base_depth < 4:
        # A fine-tuned run or adapter inherits its base model's licence and obligations.
        base_ref = found["base"]
        if base_ref == "default" or Path(base_ref).exists():
            base = report(base_ref, base_depth + 1, lang)
        else:   # e.g. a Hub id in an adapter's config: judge the base by its name alone
            base = judge(Path(base_ref), "unresolved", {"names": [base_ref], "licences": [],
                                                          "notes": [f"base model {base_ref} is not here; judged by its name"]},
                         lang)
        base.update(model=str(path), format=found["format"], derived_from=base_ref)
        base["notes"] = notes + base["notes"] + [f"derived from {base_ref}: the base model's licence and duties apply to it"]
        return base
    return judge(path, found["format"], found, lang)


def judge(path: Path, fmt: str, found: dict, lang: str = "en") -> dict:
    """The report from what was found: licence claims, names, notes."""
    kb = knowledge()
    notes, conflicts = list(found["notes"]), []
    ids = [(identify_licence(text), where, text) for text, where in found["licences"]]
    unknown_claims = [(where, text) for lid, where, text in ids if lid is None and where.startswith(("GGUF", "README"))]
    for where, text in unknown_claims:
        notes.append(f"{where}: licence {text[:60]!r} is not in the knowledge base")
    found_ids = [(lid, where) for lid, where, _ in ids if lid]
    fid = identify_family(found["names"])
    by_architecture = fid is None and bool(found.get("architecture")) and identify_family(found["architecture"])
    if by_architecture:
        # The family is a guess from the architecture alone: reported, but its licence (which may
        # differ by model and size) is not taken for this model's.
        fid = by_architecture
        notes.append(f"recognised as {kb['families'][fid]['name']} by its architecture only "
                     f"({', '.join(found['architecture'])}); its licence is not known from that")
    family = kb["families"].get(fid) if fid else None
    candidates = {lid for lid, _ in found_ids}
    if family and found_ids and family["licence"] not in candidates and not by_architecture:
        conflicts.append(f"the metadata says {', '.join(sorted(candidates))}, but {family['name']} is released "
                         f"under {kb['licences'][family['licence']]['name']}")
        candidates.add(family["licence"])
    elif len(candidates) > 1:
        conflicts.append(f"the files disagree: {', '.join(f'{lid} ({w})' for lid, w in found_ids)}")
    if unknown_claims and family and not by_architecture:
        conflicts.append(f"the metadata names a licence this knowledge base does not know; {family['name']} "
                         f"is released under {kb['licences'][family['licence']]['name']}")
    elif not candidates and family and not by_architecture:
        # Only with no licence claim at all does the family's licence stand in.
        candidates.add(family["licence"])
        notes.append(f"no licence in the metadata; {family['name']} is released under "
                     f"{kb['licences'][family['licence']]['name']}")
    lid = None if unknown_claims and not found_ids else (max(candidates, key=restrictiveness) if candidates else None)
    lic = kb["licences"].get(lid) if lid else None
    # What the family published is this model's only when the model is known to be of it.
    known = None if by_architecture else family
    published = {c: (known or {}).get("published", {}).get(c, "unknown") for c in COMPONENTS}
    found_in = [w for l, w in found_ids if l == lid] or (["knowledge base (model family)"] if lic else [])
    result = {
        "model": str(path), "format": fmt, "derived_from": None,
        "family": {"id": fid, "name": family["name"], "sources": family["sources"], **checked(family)}
        if family else None,
        "license": {"id": lid, "name": lic["name"], "found_in": found_in, "osi_approved": lic.get("osi_approved"),
                    "url": lic.get("url"), **checked(lic), "acceptable_use_policy": lic.get("aup_url")} if lic else
                   {"id": None, "name": unknown_claims[0][1][:80] if unknown_claims else None,
                    "found_in": [unknown_claims[0][0]] if unknown_claims else [], "osi_approved": None, "url": None,
                    "checked": None, "verified": False},
        "commercial_use": lic.get("commercial_use") if lic else None,
        "restrictions": [{"kind": r["kind"], "clause": r["clause"], "detail": r.get(f"detail_{lang}", r["detail"])}
                         for r in lic.get("restrictions", [])] if lic else [],
        "access": (known or {}).get("access", "unknown"),
        "published": published,
        "mof_class": mof_class(lic, published) if known else (
            "none" if lic and not (lic.get("osi_approved") or lic.get("open_content")) else "unknown"),
        "osaid": osaid(lic, published, lang),
        "conflicts": conflicts,
        "notes": notes,
    }
    result["verdict"], result["reasons"] = verdict(result, lang)
    return result


def checked(entry: dict) -> dict:
    """When a knowledge-base entry was compared with the source it names ({"checked": None,
    "verified": False} for one stated from memory of the publisher's text, to verify)."""
    date = entry.get("checked")
    return {"checked": str(date) if date else None, "verified": bool(date)}


def verdict(r: dict, lang: str = "en") -> tuple[str, list[str]]:
    lic, reasons = r["license"], []
    if lic["id"] is None and r["family"] is None:
        return "unknown", [say("nothing known", lang)]
    if r["access"] == "request":
        reasons.append(say("weights only on request", lang))
    if r["commercial_use"] is False:
        reasons.append(say("no commercial use", lang))
    if reasons:
        return "not-open", reasons
    if r["osaid"]["meets"] == "meets":
        return "open-source", [say("all published", lang, licence=lic["name"])]
    # Weights in hand: the family publishes them, or this very file or directory holds them.
    has_weights = r["published"]["weights"] is True or r["format"] in ("gguf", "hf", "meta", "run", "adapter")
    if r["osaid"]["meets"] == "fails" and has_weights:
        gated = [say("gated", lang)] if r["access"] == "gated" else []
        return "open-weights-restricted", gated + r["osaid"]["reasons"]
    if r["osaid"]["meets"] == "fails":
        return "not-open", r["osaid"]["reasons"]
    return "unknown", r["osaid"]["reasons"]


# --- text -----------------------------------------------------------------------------------------

TEXT = {
    "en": {"open-source": "Open source: {model} may be used, studied, modified and shared for any purpose.",
           "open-weights-restricted": "Open weights with restrictions: {model} can be downloaded and run, but {reasons}.",
           "not-open": "Not open: {model} — {reasons}.",
           "unknown": "Unknown: {reasons} for {model}.",
           "licence": "licence", "found in": "found in", "restrictions": "restrictions", "published": "published",
           "mof": "Model Openness Framework", "osaid": "OSI Open Source AI Definition", "verdict": "verdict",
           "none found": "none found", "conflicts": "conflicts", "notes": "notes", "family": "family", "access": "access",
           "OSI-approved": "OSI-approved", "checked": "checked {date}", "unverified": "unverified (to check against "
           "its source)", "aup": "acceptable use policy", "derived from": "derived from",
           True: "yes", False: "no", "not known": "unknown"},
    "zh": {"open-source": "开源：{model} 可以出于任何目的使用、研究、修改和分享。",
           "open-weights-restricted": "开放权重但有限制：{model} 可以下载和运行，但{reasons}。",
           "not-open": "不开放：{model}——{reasons}。",
           "unknown": "未知：{model}，{reasons}。",
           "licence": "许可证", "found in": "出处", "restrictions": "限制条款", "published": "已公开的内容",
           "mof": "模型开放框架（MOF）", "osaid": "OSI 开源人工智能定义", "verdict": "结论",
           "none found": "未找到", "conflicts": "冲突", "notes": "说明", "family": "模型系列", "access": "获取方式",
           "OSI-approved": "OSI 批准", "checked": "核对于 {date}", "unverified": "未核实（待与来源核对）",
           "aup": "可接受使用政策", "derived from": "派生自",
           True: "是", False: "否", "not known": "未知"},
}
# Words of the report that come from the knowledge base's vocabulary, by language.
WORDS_ZH = {
    # verdicts, OSAID results, access
    "open-source": "开源", "open-weights-restricted": "开放权重（有限制）", "not-open": "不开放", "unknown": "未知",
    "meets": "符合", "fails": "不符合", "open": "公开", "gated": "须接受条款", "request": "须申请",
    "none": "无", "Class I": "I 类（开放科学）", "Class II": "II 类（开放工具）", "Class III": "III 类（开放模型）",
    # components
    "weights": "权重", "inference_code": "推理代码", "training_code": "训练代码", "training_data": "训练数据",
    "data_recipe": "数据配方", "tokenizer": "分词器", "evaluation": "评测", "technical_report": "技术报告",
    "intermediate_checkpoints": "中间检查点",
    # restriction kinds
    "commercial_use": "商业使用", "user_cap": "用户数上限", "acceptable_use": "可接受使用政策",
    "output_training": "禁止用输出训练其他模型", "naming_attribution": "命名与署名义务",
    "field_of_use": "使用领域限制", "redistribution": "再分发条件",
}
# The report's reasons, by message: English, Chinese.
MESSAGES = {
    "no licence identified": ("no licence identified", "未识别出许可证"),
    "not OSI-approved": ("{licence} is not an OSI-approved (or open content) licence",
                         "{licence} 不是 OSI 批准的（或开放内容）许可证"),
    "use is restricted": ("use is restricted: {limits}", "使用受限：{limits}"),
    "not published": ("{need} not published", "未公开{need}"),
    "unknown whether published": ("{need}: unknown", "{need}：未知"),
    "parameters": ("parameters", "参数（权重）"),
    "complete training code": ("complete training code", "完整的训练代码"),
    "inference code": ("inference code", "推理代码"),
    "data information": ("data information", "数据信息"),
    "nothing known": ("no licence found that this knowledge base knows, and the model family is unknown",
                      "未找到知识库认识的许可证，模型系列也未知"),
    "weights only on request": ("weights only on request", "权重仅应申请提供"),
    "no commercial use": ("no commercial use", "不允许商业使用"),
    "all published": ("{licence}, with weights, code and data information published",
                      "{licence}，权重、代码和数据信息均已公开"),
    "gated": ("weights gated behind accepting the licence", "须接受许可证方可获取权重"),
}
LIST_SEP = {"en": ", ", "zh": "、"}
LANGS = ("en", "zh")


def say(key: str, lang: str, **values) -> str:
    return MESSAGES[key][LANGS.index(lang)].format(**values)


def kind_name(kind: str, lang: str) -> str:
    return WORDS_ZH.get(kind, kind) if lang == "zh" else kind.replace("_", " ")


def word(value, lang: str) -> str:
    """A value of the report (verdict, access, component state, MOF class) in `lang`."""
    if value in (True, False):
        return TEXT[lang][value]
    if value is None or value == "unknown":
        return TEXT[lang]["not known"]
    return WORDS_ZH.get(value, str(value)) if lang == "zh" else str(value)


def width(text: str) -> int:
    """Columns a terminal gives `text`: CJK and other wide characters take two."""
    import unicodedata
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(label: str, columns: int = 12) -> str:
    return label + " " * max(1, columns - width(label))


def sentence(r: dict, lang: str = "en") -> str:
    t = TEXT[lang]
    name = r["family"]["name"] if r["family"] else Path(r["model"]).name
    sep = "；" if lang == "zh" else "; "
    return t[r["verdict"]].format(model=name, reasons=sep.join(r["reasons"]))


def format_report(r: dict, lang: str = "en") -> str:
    """The report as text: labels padded to one column (by display width, so Chinese aligns)."""
    t = TEXT[lang]
    lic = r["license"]

    def when(entry):
        return t["checked"].format(date=entry["checked"]) if entry.get("verified") else t["unverified"]

    lines = [f"{pad(t['verdict'])}{word(r['verdict'], lang)}: {sentence(r, lang)}"]
    if r["family"]:
        lines.append(f"{pad(t['family'])}{r['family']['name']} ({'; '.join(r['family']['sources'])}; "
                     f"{when(r['family'])})")
    lines.append(pad(t["licence"]) + (f"{lic['name']} [{lic['id']}], {t['OSI-approved']}: {t[bool(lic['osi_approved'])]}; "
                                       f"{t['found in']}: {', '.join(lic['found_in'])}; {lic['url']}; {when(lic)}"
                                       if lic["id"] else t["none found"]))
    if lic.get("acceptable_use_policy"):
        lines.append(f"{pad('')}{t['aup']}: {lic['acceptable_use_policy']}")
    if r["derived_from"]:
        lines.append(f"{pad('')}{t['derived from']} {r['derived_from']}")
    lines.append(f"{pad(t['access'])}{word(r['access'], lang)}")
    lines.append(f"{t['restrictions']}:")
    for x in r["restrictions"]:
        lines.append(f"  - {kind_name(x['kind'], lang)} ({x['clause']}): {x['detail']}")
    if not r["restrictions"]:
        lines.append(f"  - {t['none found']}")
    lines.append(f"{t['published']}: " + LIST_SEP[lang].join(
        f"{word(c, lang) if lang == 'zh' else c.replace('_', ' ')} {word(v, lang)}" for c, v in r["published"].items()))
    lines.append(f"{t['mof']}: {word(r['mof_class'], lang)}")
    reasons = ("; " if lang == "en" else "；").join(r["osaid"]["reasons"])
    lines.append(f"{t['osaid']}: {word(r['osaid']['meets'], lang)}" + (f" ({reasons})" if reasons else ""))
    for key in ("conflicts", "notes"):
        for x in r[key]:
            lines.append(f"{t[key]}: {x}")
    return "\n".join(lines)
