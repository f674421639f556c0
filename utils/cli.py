"""Command-line machinery that knows no flag of its own: a parser whose mistakes are one line and which remembers
which flags were given, numeric ranges checked in one place, and a flag spelled as the command line says it.
The flags themselves, their ranges and the rules between them are the CLI's (finetune.py)."""
import argparse
import math
import re
from typing import Dict, NamedTuple, Optional, Tuple

from .distributed import rank_prefix
from .errors import UserError, escape_controls

EXIT_USER_ERROR = 2


class ParsedArgs(argparse.Namespace):
    """The parsed command line.  ``given`` (the destinations the command line set explicitly) lives in a slot,
    outside ``vars(args)``, so it is not saved with the arguments."""
    __slots__ = ('given',)


# Every spelling of a negative number float() reads: argparse's own pattern (-1, -0.5) takes -1e-3, -inf and -nan
# for flags, so `--lr -1e-3` said "expected one argument" instead of the flag's range.
NEGATIVE_NUMBER = re.compile(r'^-(?:(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:e[-+]?\d[\d_]*)?|inf(?:inity)?|nan)$',
                             re.IGNORECASE)


class OneLineParser(argparse.ArgumentParser):
    """A mistyped flag or value is one line (argparse would print the whole usage first), exit code 2, and the
    parsed arguments remember which flags were given (``ParsedArgs.given``).  A negative number in any spelling
    (``-1e-3``, ``-inf``) is a value, as ``-1`` is for argparse, so its flag's own check can refuse it."""

    def __init__(self, *args, spelled_here: Optional[Dict[str, str]] = None, **kwargs):
        """``spelled_here``: flags of related programs that this one spells otherwise (``{'--epochs':
        '--final_finetune'}``); an unrecognised one is answered with this program's spelling."""
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER
        self._spelled_here = dict(spelled_here or {})

    def error(self, message):
        if message.startswith('unrecognized arguments:'):
            given = {word.split('=', 1)[0] for word in message.split(':', 1)[1].split()}
            message += ''.join(f'; here {flag} is {ours}' for flag, ours in self._spelled_here.items()
                               if flag in given)
        # (a stray argument is named as typed: a newline in it would end the line)
        # (under a launcher every process parses the same flags and says so: each line names its process, as the
        # errors found later do)
        self.exit(EXIT_USER_ERROR, f'{rank_prefix()}error: {escape_controls(message)} (see --help)\n')

    def _get_values(self, action, arg_strings):
        # `--flag=--`: argparse takes the '--' away as the end of the flags, leaving the flag an empty list (or, for
        # one of an optional value, its const): the '--' is refused as the value it was written as
        if action.option_strings and arg_strings == ['--']:
            raise argparse.ArgumentError(action, "'--' is not a value")
        return super()._get_values(action, arg_strings)

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, ParsedArgs() if namespace is None else namespace)
        if isinstance(parsed, ParsedArgs):
            parsed.given = self._given(args)
        return parsed, extras

    def _given(self, args) -> frozenset:
        """The destinations set on the command line: the same parse with every default suppressed."""
        saved = [(action, action.default) for action in self._actions]
        saved_defaults = self._defaults
        try:
            for action in self._actions:
                action.default = argparse.SUPPRESS
            self._defaults = {}
            probe, _ = super().parse_known_args(args, argparse.Namespace())
        finally:
            for action, default in saved:
                action.default = default
            self._defaults = saved_defaults
        return frozenset(vars(probe))


def flag_name(action: argparse.Action) -> str:
    """The flag as users write it: its first ``--`` spelling."""
    return next((s for s in action.option_strings if s.startswith('--')), action.option_strings[0])


def spell(parser: argparse.ArgumentParser, dest: str, value) -> str:
    """``dest = value`` as the command line says it: ``--model-ema``, ``--no-model-ema``, ``--lr 0.01``."""
    actions = [a for a in parser._actions if a.dest == dest]
    if isinstance(value, bool):
        switch = next((a for a in actions if a.nargs == 0 and a.const is value), None)
        return flag_name(switch) if switch else f'{flag_name(actions[0])} not given'
    if isinstance(value, (list, tuple)):
        value = ' '.join(map(str, value))
    return f'{flag_name(actions[0])} {value if value not in (None, "") else "(unset)"}'


def fits(action: argparse.Action, value) -> bool:
    """Whether ``value`` (read from a file, say a checkpoint's args) is something this flag can hold."""
    if action.nargs == 0:
        return isinstance(value, bool)
    if value is None:
        return action.default is None
    if action.nargs in ('+', '*'):
        return isinstance(value, (list, tuple)) and all(_fits_one(action, v) for v in value)
    return _fits_one(action, value)


def _fits_one(action: argparse.Action, value) -> bool:
    if isinstance(value, bool):
        return False
    if action.type is float:
        ok = isinstance(value, (int, float))
    elif action.type is int:
        ok = isinstance(value, int)
    else:
        ok = isinstance(value, str)
    return ok and (action.choices is None or value in action.choices)


# ----------------------------------------------------------------------------------------------------------
# numeric ranges

class Range(NamedTuple):
    """The values a numeric flag accepts: finite, from ``low`` to ``high`` (None: unbounded), ends included
    unless open; ``count``: how many values a list flag takes (min, max)."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    count: Optional[Tuple[int, int]] = None

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            if self.low_open:
                return 'positive' if self.low == 0 else f'more than {low}'
            return '0 or more' if self.low == 0 else f'at least {low}'
        return f'in {"(" if self.low_open else "["}{low}, {high}{")" if self.high_open else "]"}'

    def holds(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))


def _number(x) -> str:
    return '' if x is None else str(int(x)) if float(x).is_integer() else f'{x:g}'


UNIT = Range(0, 1)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)


def check_numbers(args, parser: argparse.ArgumentParser, ranges: Dict[str, Range]) -> None:
    """Every numeric flag of ``parser`` (type int or float) finite and in its range (``ranges``, by destination;
    a numeric flag without one is a KeyError, a programming mistake); the message names the flag."""
    for action in parser._actions:
        if action.type not in (int, float):
            continue
        flag = flag_name(action)
        accepted = ranges[action.dest]
        value = getattr(args, action.dest, None)
        if value is None:
            continue  # the flags whose default is None: unset
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if accepted.count and not accepted.count[0] <= len(values) <= accepted.count[1]:
            low, high = accepted.count
            raise UserError(f'{flag} takes {low if low == high else f"{low} or {high}"} values, got {len(values)}')
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserError(f'{flag} must be a number, got {v!r}')
            if not math.isfinite(v):
                raise UserError(f'{flag} must be finite and {accepted.describe()}, got {v}')
            if not accepted.holds(v):
                raise UserError(f'{flag} must be {accepted.describe()}, got {v}')


def check_whole_patches(size: int, patch_size: Tuple[int, int], model: str) -> None:
    """``--input-size size`` is a whole number of the ``patch_size`` patches of ``model`` (named as the message
    says it); else a UserError: the patch embedding would drop the rest of the image."""
    ph, pw = patch_size
    if size % ph or size % pw:
        raise UserError(f'--input-size {size} is not a whole number of {ph}x{pw} patches of {model} (the patch '
                        f'embedding would drop the rest of the image)')
