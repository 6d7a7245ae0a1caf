"""The syntax of :mod:`tfcompat_ema.linear_regex`: patterns parsed into trees.

Nodes are tuples: ``("char", test, text)`` (one character passing ``test``),
``("cat", nodes)``, ``("alt", nodes)``, ``("repeat", node, min, max or None, greedy)``,
``("group", name, node)``, ``("assert", "^" or "$")``.

>>> parse("a|b")[0]
'alt'
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

MAX_REPEAT = 1000
MAX_NESTING = 100


class RegexError(ValueError):
    """A pattern this module does not accept: a syntax error, or a construct it refuses."""


Node = tuple
_CATEGORIES: Dict[str, Callable[[str], bool]] = {
    "d": str.isdecimal,
    "w": lambda c: c.isalnum() or c == "_",
    "s": str.isspace,
}
_CONTROL = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}


def literal(text: str) -> Node:
    """The node that matches ``text`` as it is."""
    return ("cat", [("char", (lambda c, want=ch: c == want), ch) for ch in text])


def group(name: str, node: Node) -> Node:
    """A capturing group: :meth:`Regex.fullmatch` returns what it matched under ``name``."""
    return ("group", name, node)


def sequence(nodes: Sequence[Node]) -> Node:
    return ("cat", list(nodes))


def repeat(node: Node, minimum: int, maximum: Optional[int] = None) -> Node:
    return ("repeat", node, minimum, maximum, True)


def parse(pattern: str) -> Node:
    """The syntax tree of ``pattern`` (see the module's doc for what is accepted)."""
    if not isinstance(pattern, str):
        raise RegexError(f"a regex must be a string, got {type(pattern).__name__}")
    parser = _Parser(pattern)
    node = parser.alternation(0)
    if parser.position < len(pattern):          # only a stray ")" stops the top level
        raise RegexError(f"unbalanced parenthesis (at {parser.position})")
    return node


class _Parser:
    def __init__(self, pattern: str):
        self.text, self.position = pattern, 0

    def error(self, message: str, at: Optional[int] = None) -> RegexError:
        return RegexError(f"{message} (at {self.position if at is None else at})")

    def peek(self, ahead: int = 0) -> str:
        index = self.position + ahead
        return self.text[index] if index < len(self.text) else ""

    def alternation(self, depth: int) -> Node:
        if depth > MAX_NESTING:
            raise self.error(f"groups nested more than {MAX_NESTING} deep")
        branches = [self.concatenation(depth)]
        while self.peek() == "|":
            self.position += 1
            branches.append(self.concatenation(depth))
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self, depth: int) -> Node:
        items: List[Node] = []
        while self.peek() not in ("", "|", ")"):
            start = self.position
            atom = self.atom(depth)
            quantified = self.quantifier(atom, start)
            items.append(quantified)
        return ("cat", items)

    def atom(self, depth: int) -> Node:
        char = self.peek()
        self.position += 1
        if char == "(":
            return self.group(depth)
        if char == "[":
            return self.char_class()
        if char == ".":
            return ("char", lambda c: c != "\n", ".")
        if char == "^":
            return ("assert", "^")
        if char == "$":
            return ("assert", "$")
        if char == "\\":
            return self.escape(in_class=False)
        if char in "*+?":
            raise self.error("nothing to repeat", self.position - 1)
        if char == "{" and self.counted(self.position - 1) is not None:
            raise self.error("nothing to repeat", self.position - 1)
        return literal(char)

    def group(self, depth: int) -> Node:
        start = self.position - 1
        if self.peek() == "?":
            kind = self.peek(1)
            if kind == ":":
                self.position += 2
            elif kind in ("=", "!") or (kind == "<" and self.peek(2) in ("=", "!")):
                raise self.error("lookaround assertions are not supported", start)
            elif kind == "P" and self.peek(2) == "=":
                raise self.error("backreferences are not supported", start)
            elif kind == "P" or kind == "<":
                raise self.error("named groups are not supported (placeholders name groups)",
                                 start)
            elif kind == ">":
                raise self.error("atomic groups are not supported", start)
            elif kind == "(":
                raise self.error("conditional groups are not supported", start)
            else:
                raise self.error("inline flags and (?...) extensions are not supported", start)
        node = self.alternation(depth + 1)
        if self.peek() != ")":
            raise self.error("missing ), unterminated subpattern", start)
        self.position += 1
        return node

    def counted(self, start: int) -> Optional[Tuple[int, Optional[int], int]]:
        """``{m}``, ``{m,}``, ``{,n}``, ``{m,n}`` at ``start``: (min, max, end); None: a literal."""
        end = self.text.find("}", start)
        if end < 0:
            return None
        body = self.text[start + 1:end]
        low, comma, high = body.partition(",")
        if not (low.isdigit() or (comma and low == "")) or not (high.isdigit() or high == ""):
            return None
        if not low.isascii() or not high.isascii() or (not comma and not low):
            return None
        minimum = int(low or 0)
        maximum = minimum if not comma else (int(high) if high else None)
        return minimum, maximum, end + 1

    def quantifier(self, atom: Node, start: int) -> Node:
        char = self.peek()
        if char in ("*", "+", "?"):
            minimum, maximum = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
            self.position += 1
        elif char == "{" and self.counted(self.position) is not None:
            minimum, maximum, self.position = self.counted(self.position)
            if max(minimum, maximum or 0) > MAX_REPEAT:
                raise self.error(f"repeat counts above {MAX_REPEAT} are not supported", start)
            if maximum is not None and maximum < minimum:
                raise self.error("min repeat greater than max repeat", start)
        else:
            return atom
        if atom[0] == "assert":
            raise self.error("nothing to repeat", start)
        greedy = True
        if self.peek() == "?":
            greedy = False
            self.position += 1
        elif self.peek() == "+":
            raise self.error("possessive quantifiers are not supported", self.position)
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and
                                              self.counted(self.position) is not None):
            raise self.error("multiple repeat", self.position)
        return ("repeat", atom, minimum, maximum, greedy)

    def escape(self, in_class: bool) -> Node:
        start = self.position - 1
        char = self.peek()
        if not char:
            raise self.error("bad escape (end of pattern)", start)
        self.position += 1
        if char.lower() in _CATEGORIES:
            test = _CATEGORIES[char.lower()]
            if char.isupper():
                return ("char", lambda c, t=test: not t(c), "\\" + char)
            return ("char", test, "\\" + char)
        if char in _CONTROL and not (char == "0" and self.peek().isdigit()):
            return literal(_CONTROL[char])
        if char in ("x", "u"):
            digits = 2 if char == "x" else 4
            code = self.text[self.position:self.position + digits]
            if len(code) != digits or any(c not in "0123456789abcdefABCDEF" for c in code):
                raise self.error(f"bad escape \\{char}", start)
            self.position += digits
            return literal(chr(int(code, 16)))
        if char.isdigit():
            raise self.error("backreferences are not supported", start)
        if not in_class and char in ("A", "Z"):
            return ("assert", "^" if char == "A" else "$")
        if char.isascii() and char.isalnum():
            raise self.error(f"bad or unsupported escape \\{char}", start)
        return literal(char)

    def char_class(self) -> Node:
        start = self.position - 1
        negate = self.peek() == "^"
        if negate:
            self.position += 1
        tests: List[Callable[[str], bool]] = []
        first = True
        while True:
            char = self.peek()
            if not char:
                raise self.error("unterminated character set", start)
            if char == "]" and not first:
                self.position += 1
                break
            first = False
            low = self.class_item()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.position += 1
                high = self.class_item()
                if not (isinstance(low, str) and isinstance(high, str)):
                    raise self.error("bad character range", start)
                if ord(high) < ord(low):
                    raise self.error(f"bad character range {low}-{high}", start)
                tests.append(lambda c, a=low, b=high: a <= c <= b)
            elif isinstance(low, str):
                tests.append(lambda c, a=low: c == a)
            else:
                tests.append(low)
        text = self.text[start:self.position]
        if negate:
            return ("char", lambda c: not any(test(c) for test in tests), text)
        return ("char", lambda c: any(test(c) for test in tests), text)

    def class_item(self) -> Union[str, Callable[[str], bool]]:
        """One character of a class, or a category test (``\\d`` ...)."""
        char = self.peek()
        self.position += 1
        if char != "\\":
            return char
        node = self.escape(in_class=True)
        if node[0] == "char":
            return node[1]
        if node[0] == "cat" and len(node[1]) == 1:
            return node[1][0][2]
        raise self.error("bad escape in a character set")
