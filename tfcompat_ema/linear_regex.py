"""Regular expressions matched in linear time, for rule patterns and ignore lists.

Rules files come from users, and variable names from checkpoints; Python's :mod:`re`
backtracks, so a pattern like ``(a+)+b`` takes exponential time on ``aaaa...a`` and a
rules file could hang ``tfcompat-ema``. Here a pattern is compiled to a Thompson NFA and
run as a Pike VM: the time is at most (name length) x (program size), whatever the
pattern, and the groups are those Python's ``re.fullmatch`` gives (leftmost-first).

The syntax is the regular subset of Python's, which is all that names need:

* literal characters, ``.`` (any character but a newline), escaped punctuation (``\\.``);
* classes ``[a-z_]``, ``[^./]``; ``\\d \\D \\w \\W \\s \\S`` (Unicode, as :mod:`re`);
  ``\\n \\t \\r \\f \\v \\xhh \\uhhhh``;
* groups ``(...)`` and ``(?:...)`` (neither captures: a rule's placeholders are its groups),
  alternation ``|``;
* quantifiers ``* + ? {m} {m,} {m,n}`` (``n`` up to 1000), and their lazy forms (``*?``);
* ``^``/``\\A`` and ``$``/``\\Z`` (the whole name is matched anyway).

Refused, with a :class:`RegexError` that says why: backreferences, lookaround assertions,
atomic groups, possessive quantifiers, inline flags, named groups, word boundaries.

Example:
    >>> from tfcompat_ema import linear_regex
    >>> slow_in_re = linear_regex.compile("(a+)+b")
    >>> slow_in_re.fullmatch("a" * 10_000) is None      # at once; re takes forever
    True
    >>> linear_regex.compile(".*/Adam(_1)?").fullmatch("dense/kernel/Adam_1")
    {}
    >>> linear_regex.compile(r"(a\\1)")
    Traceback (most recent call last):
    ...
    tfcompat_ema.regex_syntax.RegexError: backreferences are not supported (at 2)
"""
from __future__ import annotations

from typing import Dict, List, Optional

from .regex_syntax import (MAX_NESTING, MAX_REPEAT, Node, RegexError, group, literal, parse,
                           repeat, sequence)

__all__ = ["Regex", "RegexError", "compile", "parse", "literal", "group", "sequence", "repeat",
           "MAX_REPEAT", "MAX_NESTING"]
MAX_PROGRAM = 50_000
MAX_DFA_STATES = 10_000


# ------------------------------------------------------------------ program
# Instructions: ("char", test), ("split", first, second), ("jmp", target), ("save", slot),
# ("assert", kind), ("match",). A split tries ``first`` before ``second``.

class _Compiler:
    def __init__(self):
        self.program: List[list] = []
        self.groups: List[str] = []

    def emit(self, *instruction) -> int:
        if len(self.program) >= MAX_PROGRAM:
            raise RegexError(f"pattern too large (over {MAX_PROGRAM} steps once its repeats "
                             "are written out)")
        self.program.append(list(instruction))
        return len(self.program) - 1

    def node(self, node: Node) -> None:
        kind = node[0]
        if kind == "char":
            self.emit("char", node[1])
        elif kind == "cat":
            for item in node[1]:
                self.node(item)
        elif kind == "alt":
            jumps = []
            for branch in node[1][:-1]:
                split = self.emit("split", None, None)
                self.program[split][1] = len(self.program)
                self.node(branch)
                jumps.append(self.emit("jmp", None))
                self.program[split][2] = len(self.program)
            self.node(node[1][-1])
            for jump in jumps:
                self.program[jump][1] = len(self.program)
        elif kind == "group":
            if node[1] in self.groups:
                raise RegexError(f"group {node[1]!r} appears twice")
            self.groups.append(node[1])
            slot = 2 * (len(self.groups) - 1)
            self.emit("save", slot)
            self.node(node[2])
            self.emit("save", slot + 1)
        elif kind == "assert":
            self.emit("assert", node[1])
        elif kind == "repeat":
            self.repeat(*node[1:])
        else:                                       # pragma: no cover - internal
            raise AssertionError(f"unknown node {kind!r}")

    def optional(self, body: Node, greedy: bool) -> int:
        split = self.emit("split", None, None)
        self.node(body)
        end = len(self.program)
        self.program[split][1:] = [split + 1, end] if greedy else [end, split + 1]
        return split

    def repeat(self, body: Node, minimum: int, maximum: Optional[int], greedy: bool) -> None:
        for _ in range(minimum):
            self.node(body)
        if maximum is None:
            split = self.optional(body, greedy)
            self.emit("jmp", split)
            end = len(self.program)
            self.program[split][1:] = [split + 1, end] if greedy else [end, split + 1]
        else:
            for _ in range(maximum - minimum):
                self.optional(body, greedy)


class Regex:
    """A compiled pattern; :meth:`fullmatch` runs in time linear in the text's length."""

    def __init__(self, node: Node, source: str = ""):
        compiler = _Compiler()
        compiler.node(node)
        compiler.emit("assert", "$")
        compiler.emit("match")
        self.pattern = source
        self.groups = list(compiler.groups)
        self._program = [tuple(instruction) for instruction in compiler.program]
        self._prefix = self._literal_prefix(node)
        self._transitions: Dict[tuple, frozenset] = {}

    def __repr__(self) -> str:
        return f"linear_regex.compile({self.pattern!r})"

    @staticmethod
    def _literal_prefix(node: Node) -> str:
        """Text every match starts with (a quick test before running the machine)."""
        prefix = []
        items = list(node[1]) if node[0] == "cat" else [node]
        while items:
            item = items.pop(0)
            if item[0] == "cat":
                items[:0] = item[1]
            elif item[0] == "group":
                items.insert(0, item[2])
            elif item[0] == "char" and len(item[2]) == 1 and item[2] not in ".\\[":
                prefix.append(item[2])
            else:
                break
        return "".join(prefix)

    def fullmatch(self, text: str) -> Optional[Dict[str, str]]:
        """The groups' texts if the whole of ``text`` matches (``{}`` without groups), else None.

        >>> compile("[a-z]+_(?:[0-9]+)").fullmatch("layer_10")
        {}
        >>> compile("[a-z]+_(?:[0-9]+)").fullmatch("layer_1a") is None
        True
        """
        if not text.startswith(self._prefix) or not self._accepts(text):
            return None
        if not self.groups:
            return {}
        program, size = self._program, len(text)
        slots = (None,) * (2 * len(self.groups))
        threads = self._closure([(0, slots)], 0, size)
        for position in range(size):
            char = text[position]
            advanced = [(pc + 1, saved) for pc, saved in threads
                        if program[pc][0] == "char" and program[pc][1](char)]
            if not advanced:
                return None
            threads = self._closure(advanced, position + 1, size)
        for pc, saved in threads:
            if program[pc][0] == "match":
                return {name: text[saved[2 * i]:saved[2 * i + 1]]
                        for i, name in enumerate(self.groups)}
        return None

    def _accepts(self, text: str) -> bool:
        """Whether ``text`` matches, by the NFA's states as sets (a DFA built as it runs,
        cached, at most :data:`MAX_DFA_STATES` states kept): no groups, no priorities."""
        program, cache = self._program, self._transitions
        state = self._sets([0], at_start=True, at_end=False)
        for char in text:
            key = (state, char)
            following = cache.get(key)
            if following is None:
                if len(cache) >= MAX_DFA_STATES:
                    cache.clear()
                following = cache[key] = self._sets(
                    [pc + 1 for pc in state if program[pc][0] == "char" and program[pc][1](char)],
                    at_start=False, at_end=False)
            if not following:
                return False
            state = following
        final = self._sets([pc for pc in state if program[pc][0] == "assert"], at_start=False,
                           at_end=True)
        return any(program[pc][0] == "match" for pc in final)

    def _sets(self, starts, at_start: bool, at_end: bool) -> frozenset:
        """The ``char``/``match`` steps reachable from ``starts`` without reading, and the
        ``$`` asserts waiting for the end (all of them at once, when ``at_end``)."""
        program, seen, stack, found = self._program, set(), list(starts), []
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            instruction = program[pc]
            kind = instruction[0]
            if kind == "jmp":
                stack.append(instruction[1])
            elif kind == "split":
                stack += [instruction[1], instruction[2]]
            elif kind == "save":
                stack.append(pc + 1)
            elif kind == "assert":
                if instruction[1] == "^" and at_start or instruction[1] == "$" and at_end:
                    stack.append(pc + 1)
                elif instruction[1] == "$" and not at_end:
                    found.append(pc)
            else:
                found.append(pc)
        return frozenset(found)

    def _closure(self, starts, position: int, size: int):
        """The threads at ``position``: every ``char``/``match`` reachable from ``starts``
        without reading, in priority order, each once (which makes the run linear)."""
        program, seen, threads = self._program, set(), []
        for start in starts:
            stack = [start]
            while stack:
                pc, saved = stack.pop()
                if pc in seen:
                    continue
                seen.add(pc)
                instruction = program[pc]
                kind = instruction[0]
                if kind == "jmp":
                    stack.append((instruction[1], saved))
                elif kind == "split":
                    stack.append((instruction[2], saved))
                    stack.append((instruction[1], saved))
                elif kind == "save":
                    saved = saved[:instruction[1]] + (position,) + saved[instruction[1] + 1:]
                    stack.append((pc + 1, saved))
                elif kind == "assert":
                    if position == (0 if instruction[1] == "^" else size):
                        stack.append((pc + 1, saved))
                else:
                    threads.append((pc, saved))
        return threads


def compile(pattern: str) -> Regex:
    """A user's regex (no groups of its own), for :meth:`Regex.fullmatch`."""
    return Regex(parse(pattern), pattern)
