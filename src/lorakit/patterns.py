"""Regexes from adapter configs, refused when they could take unbounded time to match.

``target_modules`` / ``exclude_modules`` (a string), ``rank_pattern`` / ``alpha_pattern`` keys,
``layers_pattern`` and ``modules_to_save`` entries (PEFT matches each inside
``(^|.*\\.)<entry>($|\\..*)``: ``targets.left_out_as_saved``) are regexes written by whoever
made the adapter: untrusted input. Python's
``re`` backtracks, so a pattern like ``(.*)*x`` takes exponential time on a module name and
``.*.*.*.*.*x`` a high power of its length; one such key would hang ``load_adapter``, ``lorakit
inspect`` and a server. ``check_pattern`` refuses, before any matching:

- patterns over ``MAX_PATTERN_CHARS`` characters;
- nested quantifiers: a group that repeats a variable number of times (``*``, ``+``, ``{m,n}``)
  and itself holds a variable repeat or an alternation (``(a+)+``, ``(.*)*``, ``(a|ab)*``);
- backreferences and conditional groups (``\\1``, ``(?(1)a|b)``);
- patterns whose estimated backtracking work exceeds ``MAX_BACKTRACKING``, counted in the ways
  ``re`` can split a name of ``NAME_CHARS`` characters among the pattern's choices: k open-ended
  repeats of one character (``.*``, ``\\d+``) in sequence split it in C(N + k, k) ways (the
  number of steps ``re`` takes on a name they cannot match: measured about 1 ns a way for
  ``.*``, 5 for ``\\d+``); an optional ``?`` counts 2**3 (retrying it re-runs everything after
  it, which ``.*``'s quick scan does not); an alternation counts one branch when the first
  character decides, for plain strings the branches that can match at one place (those that are
  prefixes of one another, ``(attn|attn_out)``: 2), else its branches cubed (``(.|..)``: each
  may match where another did) -- but only their sum at the end of the pattern, where nothing
  follows to be retried (Unsloth's ``(?:.*?(?:language|text).*?...)|(?:model\\.layers...)``).
  A repeated group or alternation (``(.)*``, ``(?:ab|c)*``) counts 16 ways a step (``re``
  re-enters it per character: 10-20x a ``.*``); a lookaround of plain text adds nothing. A
  ``rank_pattern`` / ``alpha_pattern`` key is counted inside the regex it is matched with,
  ``(.*\\.)?(key)$`` (one more open-ended repeat), a ``layers_pattern`` inside
  ``(?:^|.*?\\.)pattern\\.(\\d+)\\.`` (two more), a ``modules_to_save`` entry inside
  ``(^|.*\\.)<entry>($|\\..*)`` (two more).
  ``MAX_BACKTRACKING = 2**24`` admits four ``.*`` as ``target_modules`` and three in a pattern
  key (about 10 ms on a 128-character name built to defeat them; lazy ``.*?`` cost about 8x a
  way, 80-130 ms there: the estimate does not tell them apart, so that Unsloth's regex, four
  ``.*?`` between literal words, passes; real module names of 20-80 characters take a small
  fraction of that) or eight ``?``, and plain names and alternations of names;
- ``rank_pattern`` / ``alpha_pattern`` / ``modules_to_save`` (every key or entry is tried on
  every module name) with more than
  ``MAX_PATTERN_KEYS`` keys, or keys whose estimates add up to more than
  ``MAX_TOTAL_BACKTRACKING`` (four keys at the limit, or thousands of plain names).

What is accepted keeps ``re``'s (and PEFT's) meaning: nothing is rewritten.
"""

from __future__ import annotations

import functools
import math
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
NAME_CHARS = 128  # the module-name length the estimate assumes (real names: 20-80)
MAX_BACKTRACKING = 2**24  # ways (module docstring): four '.*' over NAME_CHARS
MAX_TOTAL_BACKTRACKING = 4 * MAX_BACKTRACKING  # all keys of one rank_pattern / alpha_pattern
MAX_PATTERN_KEYS = 10_000
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT} | (
    {_sre.POSSESSIVE_REPEAT} if hasattr(_sre, "POSSESSIVE_REPEAT") else set()
)
_REFUSED = {_sre.GROUPREF, _sre.GROUPREF_EXISTS}
# An optional item, or an alternation of branches that may match the same text (``(.|..)``), is a
# choice ``re`` retries in full on every failure, where an open-ended repeat of one character
# (``.*``, ``\d+``) is scanned quickly: such choices count cubed (measured: 18 ``.?`` in a row
# cost ``re`` about 6 ns a way, ``.*`` about 1).
_FULL_CHOICE_WEIGHT = 3
# An open-ended repeat of a group or an alternation ('(.)*', '(?:ab|c)*') steps through re's
# slow path: measured 10-20x a '.*' per way.
_SLOW_REPEAT_WEIGHT = 16
_ONE_CHARACTER = {_sre.ANY, _sre.LITERAL, _sre.NOT_LITERAL, _sre.IN}
_HINT = "write it without repeats inside repeats, or list the module names instead"


class _Refused(Exception):
    """Why a pattern is refused (turned into a ValueError naming the field)."""


def check_pattern(what: str, pattern: str, enclosing_repeats: int = 0) -> int:
    """Raise ``ValueError`` naming ``what`` (e.g. "LoraConfig.rank_pattern key '(.*)*x'") if
    ``pattern`` is not a regex or could take unbounded time to match (module docstring);
    else its estimated backtracking work. ``enclosing_repeats``: the open-ended repeats of the
    regex it is matched inside (a ``rank_pattern`` key: 1, ``(.*\\.)?(key)$``; a
    ``layers_pattern``: 2, ``(?:^|.*?\\.)pattern\\.(\\d+)\\.``)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(
            f"{what} is {len(pattern)} characters long; patterns from adapter configs may have "
            f"at most {MAX_PATTERN_CHARS}. List the module names instead."
        )
    try:
        parsed = _parser.parse(pattern)
        re.compile(pattern)
        cost = _value(_times(_cost(list(parsed)), {enclosing_repeats: 1}))
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
            f"{MAX_BACKTRACKING}: e.g. four '.*'); simplify it, or list the module names instead."
        )
    return cost


def check_pattern_set(
    what: str, patterns: list[str], item: str = "key", enclosing_repeats: int = 1
) -> None:
    """Check every key of a ``rank_pattern`` / ``alpha_pattern`` (each is tried on every module
    name): at most ``MAX_PATTERN_KEYS`` keys, each bounded, ``MAX_TOTAL_BACKTRACKING`` in all.
    ``item`` names one pattern in messages ("entry" for ``modules_to_save``);
    ``enclosing_repeats`` as for ``check_pattern`` (a key: 1, ``(.*\\.)?(key)$``)."""
    if len(patterns) > MAX_PATTERN_KEYS:
        raise ValueError(
            f"{what} has {len(patterns)} {item}s; at most {MAX_PATTERN_KEYS} are accepted (each "
            "is tried on every module name)."
        )
    for key in patterns:
        if not isinstance(key, str):
            raise ValueError(f"{what} {item} {shown(key)} is invalid: expected a regex string.")
    total = sum(
        check_pattern(f"{what} {item} {shown(key)}", key, enclosing_repeats) for key in patterns
    )
    if total > MAX_TOTAL_BACKTRACKING:
        raise ValueError(
            f"{what} is refused: its {item}s together would take too long to match (about "
            f"{total:.3g} ways to try per name, at most {MAX_TOTAL_BACKTRACKING}); use fewer "
            "open-ended repeats, or list the module names instead."
        )


def shown(pattern: object, limit: int = 80) -> str:
    """``repr(pattern)``, cut to ``limit`` characters (patterns may be thousands long)."""
    text = repr(pattern)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


# A pattern's ways as a polynomial in its open-ended repeats: {k: m} is m ways for each split of
# a name among k such repeats, C(NAME_CHARS + k, k) splits (``_value``).
_Ways = dict[int, int]
_ONE: _Ways = {0: 1}
_HUGE = 2**64  # far past any limit: larger estimates are clamped here, so they stay cheap


def _cost(items: list, tail: bool = True) -> _Ways:
    """Estimated backtracking ways of a parsed sequence: the product of its items' ways, but a
    lookaround adds its ways to those of what follows it (it is tried once where it stands).
    ``tail``: nothing follows the sequence in the pattern (its last item is never retried)."""
    rest = _ONE
    for index in range(len(items) - 1, -1, -1):
        op, value = items[index]
        if op in (_sre.ASSERT, _sre.ASSERT_NOT):
            looked = _cost(list(value[1]))
            if looked != _ONE:  # (one fixed text: constant work where it stands, no choice)
                rest = _plus(looked, rest)
        else:
            rest = _times(_item_cost(op, value, tail and index == len(items) - 1), rest)
        if _value(rest) > _HUGE:
            return {0: _HUGE}
    return rest


def _item_cost(op, value, tail: bool) -> _Ways:
    if op in _REFUSED:
        raise _Refused("backreferences and conditional groups are not allowed")
    if op in _REPEATS:
        return _repeat_cost(*value)
    if op == _sre.BRANCH:
        return _branch_cost(value[1], tail)
    if op == _sre.SUBPATTERN:
        return _cost(list(value[-1]), tail)
    if getattr(_sre, "ATOMIC_GROUP", None) is not None and op == _sre.ATOMIC_GROUP:
        return _cost(list(value))
    return _ONE


def _repeat_cost(low: int, high: int, body) -> _Ways:
    """``body`` repeated ``low`` to ``high`` times: an open-ended repeat of one character is one
    repeat of the polynomial (x); a bounded one its number of counts; ``?`` 2 cubed."""
    inner = _cost(list(body), tail=False)
    if high <= 1:  # '?': matched once or not at all, a full backtracking choice
        return _scaled(inner, (high - low + 1) ** _FULL_CHOICE_WEIGHT)
    if low != high and inner != _ONE:
        raise _Refused(
            "a repeated group holds a repeat or an alternation (nested quantifiers such as "
            "(a+)+, (.*)* or (a|ab)* can take exponential time to match)"
        )
    if inner != _ONE:  # a fixed count of a group with choices: inner ** count
        total = _ONE
        for _ in range(min(high, 64)):
            total = _times(total, inner)
            if _value(total) > _HUGE:
                return {0: _HUGE}
        return total
    if high - low >= NAME_CHARS:  # '.*', '\\d+' scanned fast; a group or an alternation
        return {1: 1 if _one_character(body) else _SLOW_REPEAT_WEIGHT}  # re-entered per step
    return {0: high - low + 1}


def _one_character(body) -> bool:
    """``body`` is one character test (``.``, ``a``, ``[^.]``, ``\\w``), which ``re`` repeats in
    its fast loop; a group (capturing), an alternation or a sequence is re-entered per step."""
    items = list(body)
    return len(items) == 1 and items[0][0] in _ONE_CHARACTER


def _branch_cost(branches: list, tail: bool) -> _Ways:
    """An alternation: the costliest branch when the first character decides; else each branch
    that can match at one place (for plain strings, ``_overlapping``; else all of them) may be
    retried with everything after it: their number cubed times the costliest branch, or just
    their sum at the end of the pattern (nothing after them to retry)."""
    costs = [_cost(list(branch), tail) for branch in branches]
    firsts = [_first_literal(list(branch)) for branch in branches]
    if None not in firsts and len(set(firsts)) == len(firsts):
        return _upper(costs)  # the first character decides the branch: nothing to retry
    if all(op == _sre.LITERAL for branch in branches for op, _ in branch):
        choices = _overlapping(["".join(chr(c) for _, c in branch) for branch in branches])
        return {0: choices if tail else choices**_FULL_CHOICE_WEIGHT}
    if tail:
        total: _Ways = {}
        for cost in costs:
            total = _plus(total, cost)
        return total
    return _scaled(_upper(costs), len(costs) ** _FULL_CHOICE_WEIGHT)


def _overlapping(strings: list[str]) -> int:
    """How many of these alternatives can match at one place in a name: those that are prefixes
    of the longest one matching there (duplicates included). Compared case-folded (a ``(?i)``
    pattern overlaps more); any non-ASCII alternative: all of them."""
    if not all(text.isascii() for text in strings):
        return len(strings)
    folded = [text.casefold() for text in strings]
    return max(sum(text.startswith(other) for other in folded) for text in folded)


def _times(a: _Ways, b: _Ways) -> _Ways:
    product: _Ways = {}
    for i, m in a.items():
        for j, n in b.items():
            product[i + j] = product.get(i + j, 0) + m * n
    return product


def _plus(a: _Ways, b: _Ways) -> _Ways:
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


def _upper(costs: list[_Ways]) -> _Ways:
    """At least each of ``costs``, term by term (every term counts up)."""
    return {k: max(cost.get(k, 0) for cost in costs) for k in set().union(*costs)}


def _scaled(a: _Ways, factor: int) -> _Ways:
    return {k: m * factor for k, m in a.items()}


def _value(ways: _Ways) -> int:
    """The ways on a name of ``NAME_CHARS`` characters: each split among k open-ended repeats,
    C(NAME_CHARS + k, k) of them, times its ways."""
    return sum(m * math.comb(NAME_CHARS + k, k) for k, m in ways.items())


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
