"""The user's mistakes: one exception type, printed by the CLI as one line ``error: ...`` with exit code 2."""
import re


class UserError(Exception):
    """A mistake in what the user asked for; the CLI prints it as one line and exits non-zero."""


class OutputWriteError(UserError):
    """A file the run writes could not be written (a full disk, its folder removed): found midway, so the CLI
    says it with what the run has kept (its last complete checkpoint)."""


def one_line(e: BaseException) -> str:
    """The last meaningful line of an error: errors re-raised from DataLoader workers carry a traceback in
    front of it, and the exception's own name may be repeated there."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    last = lines[-1]
    # 'BadImageError: ...' or, from a worker's traceback, 'datasets.BadImageError: ...'
    name = re.match(r'(?:[\w.]+\.)?' + re.escape(type(e).__name__) + r': ', last)
    return last[name.end():] if name else last


def few_names(names, n: int = 5) -> str:
    """The first ``n`` of ``names`` for a message, and how many more there are: 'a, b, c (+4 more)'."""
    return ', '.join(names[:n]) + (f' (+{len(names) - n} more)' if len(names) > n else '')
