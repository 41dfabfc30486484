"""Errors a user can act on. Every message names the file, key or value and says what was expected."""


class FlashError(Exception):
    """Base class for errors caused by input (files, arguments); the CLI prints them as one line."""


class CheckpointError(FlashError, ValueError):
    """A weights file is unreadable, incomplete, of the wrong architecture or of the wrong shape."""


class TokenizerNotFoundError(FlashError, FileNotFoundError):
    """No tokenizer files were found where they were looked for."""


def one_line(err: BaseException) -> str:
    """An error message folded onto one line (multi-line messages list places looked, for example)."""
    lines = (line.strip() for line in str(err).splitlines())
    return "; ".join(line[2:] if line.startswith("- ") else line for line in lines if line)  # "- " bullets
