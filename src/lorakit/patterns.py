"""Regexes from adapter configs, refused when they could take unbounded time to match.

``target_modules`` / ``exclude_modules`` (a string), ``rank_pattern`` / ``alpha_pattern`` keys and
``layers_pattern`` are regexes written by whoever made the adapter: untrusted input. Python's
``re`` backtracks, so a pattern like ``(.*)*x`` takes exponential time on a module name and
``.*.*.*.*.*x`` a high power of its length; one such key would hang ``load_adapter``, ``lorakit
inspect`` and a server. ``check_pattern`` refuses, before any matching:

- patterns over ``MAX_PATTERN_CHARS`` characters;
- nested quantifiers: a group that repeats a variable number of times (``*``, ``+``, ``{m,n}``)
  and itself holds a variable repeat or an alternation (``(a+)+``, ``(.*)*``, ``(a|ab)*``);
- backreferences and conditional groups (``\\1``, ``(?(1)a|b)``);
- patterns whose estimated backtracking work exceeds ``MAX_BACKTRACKING``: the product over the
  repeats of their number of choices (``max - min + 1``, at most 65 for an open-ended one; 2**3
  for an optional ``?``) times, for each alternation, its number of branches (one when each
  branch starts with its own literal character: the first character decides; cubed when the
  branches are not plain strings, e.g. ``(.|..)``).
  ``MAX_BACKTRACKING = 65**3`` admits three ``.*`` (PEFT's own example
  ``.*decoder.*(SelfAttention|EncDecAttention).*(q|k|v|o)$``) or six ``?``, and plain names and
  alternations of names;
- ``rank_pattern`` / ``alpha_pattern`` (every key is tried on every module name) with more than
  ``MAX_PATTERN_KEYS`` keys, or keys whose estimates add up to more than
  ``MAX_TOTAL_BACKTRACKING`` (four keys with three ``.*`` each, or thousands of plain names).

What is accepted keeps ``re``'s (and PEFT's) meaning: nothing is rewritten.
"""

from __future__ import annotations

import functools
import re

try:  # Python >= 3.11
    from re import _constants as _sre
    from re import _parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre
    import sre_parse as _parser

__all__ = [
    "MAX_BACKTRACKING",
    "MAX_PATTERN_CHARS",
    "MAX_PATTERN_KEYS",
    "MAX_TOTAL_BACKTRACKING",
    "check_pattern",
    "check_pattern_set",
    "compiled",
    "shown",
]

MAX_PATTERN_CHARS = 4096
_CHOICES_CAP = 65  # choices counted for an open-ended repeat (module names are short)
MAX_BACKTRACKING = _CHOICES_CAP**3
MAX_TOTAL_BACKTRACKING = 4 * MAX_BACKTRACKING  # all keys of one rank_pattern / alpha_pattern
MAX_PATTERN_KEYS = 10_000
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT} | (
    {_sre.POSSESSIVE_REPEAT} if hasattr(_sre, "POSSESSIVE_REPEAT") else set()
)
_REFUSED = {_sre.GROUPREF, _sre.GROUPREF_EXISTS}
# An optional item, or an alternation of branches that may match the same text (``(.|..)``), is a
# choice ``re`` retries in full on every failure, where an open-ended repeat of one character
# (``.*``, ``\d+``) is scanned quickly: such choices count cubed (measured: 18 ``.?`` in a row
# cost ``re`` far more than three ``.*``).
_FULL_CHOICE_WEIGHT = 3
_HINT = "write it without repeats inside repeats, or list the module names instead"


class _Refused(Exception):
    """Why a pattern is refused (turned into a ValueError naming the field)."""


def check_pattern(what: str, pattern: str) -> int:
    """Raise ``ValueError`` naming ``what`` (e.g. "LoraConfig.rank_pattern key '(.*)*x'") if
    ``pattern`` is not a regex or could take unbounded time to match (module docstring);
    else its estimated backtracking work."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(
            f"{what} is {len(pattern)} characters long; patterns from adapter configs may have "
            f"at most {MAX_PATTERN_CHARS}. List the module names instead."
        )
    try:
        parsed = _parser.parse(pattern)
        re.compile(pattern)
        cost = _cost(list(parsed))
    except (re.error, OverflowError) as error:
        raise ValueError(f"{what} is not a valid regular expression: {error}") from None
    except RecursionError:
        raise ValueError(f"{what} nests groups too deeply to be matched safely.") from None
    except _Refused as reason:
        raise ValueError(f"{what} is refused: {reason}; {_HINT}.") from None
    if cost > MAX_BACKTRACKING:
        raise ValueError(
            f"{what} is refused: it has too many open-ended repeats or alternatives to match "
            f"in bounded time (about {cost:.3g} ways to try per name, at most "
            f"{MAX_BACKTRACKING}: e.g. three '.*'); simplify it, or list the module names instead."
        )
    return cost


def check_pattern_set(what: str, patterns: list[str]) -> None:
    """Check every key of a ``rank_pattern`` / ``alpha_pattern`` (each is tried on every module
    name): at most ``MAX_PATTERN_KEYS`` keys, each bounded, ``MAX_TOTAL_BACKTRACKING`` in all."""
    if len(patterns) > MAX_PATTERN_KEYS:
        raise ValueError(
            f"{what} has {len(patterns)} keys; at most {MAX_PATTERN_KEYS} are accepted (each is "
            "tried on every module name)."
        )
    for key in patterns:
        if not isinstance(key, str):
            raise ValueError(f"{what} key {shown(key)} is invalid: expected a regex string.")
    total = sum(check_pattern(f"{what} key {shown(key)}", key) for key in patterns)
    if total > MAX_TOTAL_BACKTRACKING:
        raise ValueError(
            f"{what} is refused: its keys together would take too long to match (about "
            f"{total:.3g} ways to try per name, at most {MAX_TOTAL_BACKTRACKING}); use fewer "
            "open-ended repeats, or list the module names instead."
        )


def shown(pattern: object, limit: int = 80) -> str:
    """``repr(pattern)``, cut to ``limit`` characters (patterns may be thousands long)."""
    text = repr(pattern)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def _cost(items: list) -> int:
    """Estimated backtracking work of a parsed sequence: the product of its items' choices."""
    total = 1
    for op, value in items:
        total *= _item_cost(op, value)
        if total > MAX_BACKTRACKING:
            return total
    return total


def _item_cost(op, value) -> int:
    if op in _REFUSED:
        raise _Refused("backreferences and conditional groups are not allowed")
    if op in _REPEATS:
        low, high, body = value
        inner = _cost(list(body))
        if high <= 1:  # '?': matched once or not at all, a full backtracking choice
            return (high - low + 1) ** _FULL_CHOICE_WEIGHT * inner
        if low != high and inner > 1:
            raise _Refused(
                "a repeated group holds a repeat or an alternation (nested quantifiers such as "
                "(a+)+, (.*)* or (a|ab)* can take exponential time to match)"
            )
        if inner > 1:  # a fixed count of a group with choices: inner ** count
            return inner ** min(high, 64)
        return min(high - low, _CHOICES_CAP - 1) + 1
    if op == _sre.BRANCH:
        costs = [_cost(list(branch)) for branch in value[1]]
        firsts = [_first_literal(list(branch)) for branch in value[1]]
        if None not in firsts and len(set(firsts)) == len(firsts):
            return max(costs)  # the first character decides the branch: nothing to retry
        if all(op == _sre.LITERAL for branch in value[1] for op, _ in branch):
            return sum(costs)  # plain strings: they can overlap only where the name allows
        return len(costs) ** _FULL_CHOICE_WEIGHT * max(costs)
    if op == _sre.SUBPATTERN:
        return _cost(list(value[-1]))
    if op in (_sre.ASSERT, _sre.ASSERT_NOT):
        return _cost(list(value[1]))
    if getattr(_sre, "ATOMIC_GROUP", None) is not None and op == _sre.ATOMIC_GROUP:
        return _cost(list(value))
    return 1


def _first_literal(items: list) -> str | None:
    """The character a parsed sequence must start with, if it starts with a plain literal,
    case-folded: under ``(?i)`` (global or scoped) ``a`` and ``A`` (or ``k`` and the Kelvin
    sign) match the same character, so branches are told apart only by folded characters."""
    if not items or items[0][0] != _sre.LITERAL:
        return None
    return chr(items[0][1]).casefold()


@functools.lru_cache(maxsize=16384)
def compiled(pattern: str) -> re.Pattern[str]:
    """``re.compile(pattern)``, kept (configs with thousands of pattern keys would thrash the
    ``re`` module's own cache of 512)."""
    return re.compile(pattern)
