"""containerd's filter language, as `List` (containerd's ``Walk``) receives it.

Grammar (containerd ``filters`` package)::

    selectors := selector ("," selector)*
    selector  := fieldpath (operator value)?
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := "..." (Go escapes) | /.../ or |...| (regexp-friendly, only the delimiter escaped)

A bare field path tests presence. The selectors of one string must all match (AND); several
strings are alternatives (OR). No string, or only empty ones, matches everything.

Matching follows containerd's adaptor for snapshot infos: fields ``kind`` (``active``, ``view``,
``committed``), ``name``, ``parent`` and ``labels.<key>`` (the rest of the path joined with
dots, so ``labels."a.b/c"`` and ``labels.a`` both work). ``==`` needs the field present,
``!=`` compares the value (an absent field counts as ""), ``~=`` is an unanchored regexp search.

Regular expressions have containerd's semantics, RE2 (Go's ``regexp``), through the linear-time
RE2 engine (``google-re2``): a pattern RE2 refuses -- backreferences, lookarounds, possessive
repetition -- is `InvalidArgument`, as containerd answers, and no pattern can make a search take
more than time linear in the label value (Python's backtracking ``re`` took seconds on
``(a+)+$``, holding the GIL against every other call). Filters are bounded too: `MAX_FILTERS`
strings of at most `MAX_FILTER_CHARS` characters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import re2

from nydus_core.control.snapshot.model import Info, Kind
from nydus_core.errors import InvalidArgument

_KIND_NAMES = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}

_QUOTES = '"/|'
_OPERATOR_CHARS = "=!~"
_OPERATORS = ("==", "!=", "~=")
MAX_FILTERS = 64
MAX_FILTER_CHARS = 4096
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is an answer to the client, not a log line
_RE2_OPTIONS.max_mem = 8 << 20  # the compiled program's memory, whatever the pattern


class Searcher(Protocol):
    def search(self, text: str) -> Any: ...


def compile_regexp(pattern: str) -> Searcher:
    """An RE2 pattern; `ValueError` with RE2's reason when RE2 refuses it."""
    try:
        compiled: Searcher = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        text = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
        raise ValueError(text) from None
    return compiled


_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


@attrs.frozen
class Selector:
    """One ``fieldpath [op value]`` term."""

    fieldpath: tuple[str, ...]
    operator: str  # "" for presence
    value: str = ""
    regexp: Searcher | None = None

    def matches(self, info: Info) -> bool:
        value, present = field_of(info, self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.regexp is not None
        return self.regexp.search(value) is not None


@attrs.frozen
class Filter:
    """An OR of AND-groups of selectors; an empty filter matches everything."""

    alternatives: tuple[tuple[Selector, ...], ...] = ()

    def __call__(self, info: Info) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.matches(info) for s in group) for group in self.alternatives)


def field_of(info: Info, fieldpath: Sequence[str]) -> tuple[str, bool]:
    """The value of a field path on a snapshot info and whether it is present."""
    if not fieldpath:
        return "", False
    head = fieldpath[0]
    if head == "kind":
        name = _KIND_NAMES.get(info.kind)
        return (name, True) if name else ("", False)
    if head == "name":
        return info.name, True
    if head == "parent":
        return info.parent, True
    if head == "labels":
        if not info.labels:
            return "", False
        key = ".".join(fieldpath[1:])
        if key in info.labels:
            return info.labels[key], True
        return "", False
    return "", False


def parse(filters: Sequence[str]) -> Callable[[Info], bool]:
    """Parse the ``filters`` strings of a List request; a syntax error is `InvalidArgument`."""
    if len(filters) > MAX_FILTERS:
        raise InvalidArgument(f"{len(filters)} filters, at most {MAX_FILTERS} are accepted")
    groups = []
    for text in filters:
        if len(text) > MAX_FILTER_CHARS:
            raise InvalidArgument(
                f"a filter of {len(text)} characters; at most {MAX_FILTER_CHARS} are accepted"
            )
        group = _Parser(text).parse()
        if not group:
            # containerd: an empty filter string always matches, which makes the OR true.
            return Filter()
        groups.append(group)
    return Filter(tuple(groups))


class _Parser:
    """A small hand-written scanner + recursive-descent parser over one filter string."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> InvalidArgument:
        return InvalidArgument(f"invalid filter {self.text!r}: {why} at position {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> tuple[Selector, ...]:
        if self.peek() == "":
            return ()
        selectors = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return tuple(selectors)
            if ch != ",":
                raise self.fail(f"expected ',' or end of input, found {ch!r}")
            self.pos += 1
            selectors.append(self.selector())

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        ch = self.peek()
        if ch in ("", ","):
            return Selector(tuple(path), "")
        if ch not in _OPERATOR_CHARS:
            raise self.fail(f"expected an operator, found {ch!r}")
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _OPERATOR_CHARS:
            self.pos += 1
        op = self.text[start : self.pos]
        if op not in _OPERATORS:
            self.pos = start
            raise self.fail(f"unknown operator {op!r}")
        value = self.value()
        regexp = None
        if op == "~=":
            try:
                regexp = compile_regexp(value)
            except ValueError as exc:
                raise self.fail(f"bad regular expression {value!r} (RE2 syntax): {exc}") from None
        return Selector(tuple(path), op, value, regexp)

    def field(self) -> str:
        ch = self.peek()
        if ch and ch in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isascii() and
                                              (self.text[self.pos].isalnum() or self.text[self.pos] == "_")):
            self.pos += 1
        if start == self.pos:
            raise self.fail(f"expected a field name, found {ch or 'end of input'!r}")
        return self.text[start : self.pos]

    def value(self) -> str:
        ch = self.peek()
        if ch and ch in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
            self.pos += 1
        if start == self.pos:
            raise self.fail("expected a value")
        return self.text[start : self.pos]

    def quoted(self) -> str:
        quote = self.text[self.pos]
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                self.pos = start
                raise self.fail("unterminated quoted string")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            if self.pos >= len(self.text):
                continue
            esc = self.text[self.pos]
            self.pos += 1
            if esc == quote:
                out.append(quote)
            elif quote != '"':
                # regexp quoting: keep the escape for the regexp engine
                out.append("\\" + esc)
            elif esc in _GO_ESCAPES:
                out.append(_GO_ESCAPES[esc])
            elif esc in "01234567":
                out.append(chr(self._digits(esc, 8, 3)))
            elif esc in "xuU":
                out.append(chr(self._digits("", 16, {"x": 2, "u": 4, "U": 8}[esc])))
            else:
                raise self.fail(f"illegal escape \\{esc}")

    def _digits(self, first: str, base: int, count: int) -> int:
        digits = first
        while len(digits) < count and self.pos < len(self.text):
            digits += self.text[self.pos]
            self.pos += 1
        try:
            if len(digits) != count:
                raise ValueError
            return int(digits, base)
        except ValueError:
            raise self.fail(f"illegal escape digits {digits!r}") from None
