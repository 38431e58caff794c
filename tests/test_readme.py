"""README.md's two commands stay true: the main job runs and prints an answer, and the test
command is the one .ci/run runs."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_main_command_runs(tmp_path):
    """The main job fine-tunes SmolLM2 on the shipped sentiment set; it must learn the task."""
    import json
    main = code_blocks()[0].strip()
    setup, _, job = main.partition(" && ")
    assert setup == "bash scripts/setup.sh" and (ROOT / "scripts" / "setup.sh").exists()
    args = shlex.split(job)
    assert args[0] == ".venv/bin/llamaforge"
    out = tmp_path / "run"
    args[args.index("--out") + 1] = str(out)   # the README's run directory may exist already
    r = subprocess.run([sys.executable, "-m", "llamaforge", *args[1:]], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "test (best model)" in r.stdout and "weighted avg" in r.stdout
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["test"]["accuracy"] >= 0.85, final["test"]


def test_test_command_is_what_ci_runs():
    test_cmd = code_blocks()[1].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_files_the_readme_names_exist():
    """Every file of this repository that a README command names is there (the 'Use' section
    once named a test.csv that no one had)."""
    named = set()
    for block in code_blocks():
        named |= {t for t in re.split(r"[\s=]+", block) if re.match(r"(llamaforge|benchmarks|scripts)/[\w./-]+\.\w+$", t)}
    named |= set(re.findall(r"`((?:llamaforge|benchmarks|scripts)/[\w./-]+\.\w+)`", (ROOT / "README.md").read_text()))
    named |= set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "README.md").read_text()))   # pictures
    assert named, "the README names no files?"
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, missing
