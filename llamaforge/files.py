"""Files in and out, in one place: every file llamaforge reads fails with an error that names it
(and the line, where there is one), and every file or directory it writes appears whole or not at
all, so an interrupted run or export never leaves a half-written result, nor spoils an older one.

Imports neither torch nor anything of llamaforge's but its error type: every layer may use it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import LlamaforgeError

# --- reading -------------------------------------------------------------------------------------

def read_text(path: str | os.PathLike, allow_empty: bool = False) -> str:
    """A file's text: UTF-8 (a BOM is dropped), not empty; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LlamaforgeError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise LlamaforgeError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                              f"convert it, e.g. iconv -f GBK -t UTF-8") from None
    if not text.strip() and not allow_empty:
        raise LlamaforgeError(f"{path}: empty file")
    return text


def read_lines(path: str | os.PathLike) -> list[str]:
    """A text file's lines, split at \n or \r\n only: a U+2028, U+0085 or form feed inside a
    line is text (str.splitlines would split there, and shift every line number after it)."""
    lines = read_text(path).split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_json(path: str | os.PathLike, expect: type | None = dict):
    """A JSON file's value, of type `expect` (None: any); an error names the file and line."""
    path = Path(path)
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise LlamaforgeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "a JSON object", list: "a JSON array"}.get(expect, expect.__name__)
        raise LlamaforgeError(f"{path}: expected {kind}, found {type(value).__name__}")
    return value


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML file holding a mapping (a config); errors name the file and line."""
    import yaml
    path = Path(path)
    try:
        data = yaml.safe_load(read_text(path, allow_empty=True)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise LlamaforgeError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise LlamaforgeError(f"{path}: expected a mapping of setting: value")
    return data


def read_front_matter(card: str | os.PathLike) -> dict:
    """The YAML front matter of a Markdown model card ({} when there is no card or no front
    matter); a malformed one is a LlamaforgeError naming the file."""
    import yaml
    card = Path(card)
    if not card.exists():
        return {}
    text = read_text(card, allow_empty=True)
    if not text.startswith("---"):
        return {}
    parts = text.split("\n---", 1)
    if len(parts) < 2:
        raise LlamaforgeError(f"{card}: the front matter is not closed by '---'")
    try:
        data = yaml.safe_load(parts[0][3:])
    except yaml.YAMLError as e:
        raise LlamaforgeError(f"{card}: the front matter is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise LlamaforgeError(f"{card}: the front matter is not a mapping")
    return data


def cache_dir(name: str) -> Path:
    """llamaforge's cache for one kind of thing (tokens, kernels): ~/.cache/llamaforge/NAME, or
    $LLAMAFORGE_CACHE/NAME."""
    return Path(os.environ.get("LLAMAFORGE_CACHE", Path.home() / ".cache" / "llamaforge")) / name


def keep_compiled_code() -> Path:
    """Where torch.compile keeps its compiled code: ~/.cache/llamaforge/inductor (unless
    TORCHINDUCTOR_CACHE_DIR says where), not /tmp, which a reboot empties: compiling SmolLM2's LoRA
    training step took ~70 s with an empty cache and ~10 s with the step in it (2-core Xeon). Set
    before torch._dynamo is imported (it fixes the directory then): the CLI calls it first thing."""
    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir("inductor"))))


# --- writing -------------------------------------------------------------------------------------

@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary name beside `path` to write to; it becomes `path` only when the block
    succeeds, and is removed when it fails."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, value, indent: int | None = 2):
    """A JSON file (UTF-8, non-ASCII kept as it is), written whole or not at all."""
    atomic_write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, replace: bool = False):
    """Yield a temporary sibling directory that becomes out_dir only when the block succeeds.

    replace=False: out_dir must not exist or be empty (exports). replace=True: an existing out_dir
    is swapped out only once the new one is complete (the best model, rewritten during training).
    """
    out = Path(out_dir)
    if not replace and out.exists() and any(out.iterdir()):
        raise LlamaforgeError(f"{out}: exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)   # mkdtemp makes it owner-only; the result should be like any new directory
    try:
        yield tmp
        # Files as the user's umask makes any new file: safetensors writes its own 0600.
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~umask)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
