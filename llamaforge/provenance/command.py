"""The command line that made a model, for its model card: what `llamaforge` was given (set by
`cli.main`), since sys.argv, when llamaforge is called from Python, is another program's."""
from __future__ import annotations

import shlex
import sys

_ARGV: list[str] | None = None


def set_command_line(argv: list[str]):
    global _ARGV
    _ARGV = list(argv)


def command_line() -> str:
    return shlex.join(["llamaforge", *(_ARGV if _ARGV is not None else sys.argv[1:])])
