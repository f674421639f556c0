"""The user's mistakes: one exception type, printed by the CLI as one line ``error: ...`` with exit code 2."""
import re
import unicodedata


class UserError(Exception):
    """A mistake in what the user asked for; the CLI prints it as one line and exits non-zero."""


class OutputWriteError(UserError):
    """A file the run writes could not be written (a full disk, its folder removed): found midway, so the CLI
    says it with what the run has kept (its last complete checkpoint)."""


def one_line(e: BaseException) -> str:
    """An error's message as one line.  Errors re-raised from DataLoader workers carry a traceback in front of it,
    ending in the exception's name ('datasets.BadImageError: ...'): their message alone is kept, from there.  A
    UserError's message (this project's, meant as one line) is kept whole, a control character in it (a newline in
    a path) escaped; of another exception's (torch's, a library's), the last meaningful line."""
    text, name = str(e), re.escape(type(e).__name__)
    traceback = TRACEBACK in text
    if traceback:
        starts = list(re.finditer(r'^[ \t]*(?:[\w.]+\.)?' + name + r': ', text, re.M))
        if starts:
            text, traceback = text[starts[-1].end():], False
    whole = isinstance(e, UserError) and not traceback
    lines = [line.strip() for line in ([text] if whole else text.splitlines()) if line.strip()]
    if not lines:
        return type(e).__name__
    last = lines[-1]
    # 'BadImageError: ...' or, from a worker's traceback, 'datasets.BadImageError: ...'
    prefix = re.match(r'(?:[\w.]+\.)?' + name + r': ', last)
    last = last[prefix.end():] if prefix else last
    return escape_controls(last) if whole else last


TRACEBACK = 'Traceback (most recent call last):'


def escape_controls(text: str) -> str:
    """``text`` with its control characters, line or paragraph separators and surrogates (a file name's bytes that
    are not text: '\\udcff') written as Python escapes ('\\n', '\\x1b', '\\u2028'), so that it prints as one line,
    on any stream, that says what it holds."""
    return ''.join(c.encode('unicode_escape', 'backslashreplace').decode('ascii')
                   if unicodedata.category(c) in ('Cc', 'Zl', 'Zp', 'Cs') else c for c in text)


def few_names(names, n: int = 5) -> str:
    """The first ``n`` of ``names`` for a message, and how many more there are: 'a, b, c (+4 more)'."""
    return ', '.join(names[:n]) + (f' (+{len(names) - n} more)' if len(names) > n else '')
