"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class LlamaforgeError(Exception):
    """A user-facing error: bad input, a broken or unsupported file. The message names the file."""
