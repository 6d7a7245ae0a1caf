"""The linear-time regexes against Python's ``re``: same answers, same groups, no blow-up."""
import random
import re
import time
import unittest

from tfcompat_ema import linear_regex

ATOMS = ["a", "b", ".", "[ab]", "[^a]", r"\d", r"\w", "x", "(a|b)", "(ab|a)", "(a*)", "(?:b+)",
         "[a-b1]", r"\.", "[.]"]
QUANTIFIERS = ["", "", "*", "+", "?", "{2}", "{1,3}", "{,2}", "*?", "+?", "??", "{0,}"]


def random_pattern(rng, depth=0):
    items = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.2 and depth < 2:
            atom = "(" + random_pattern(rng, depth + 1) + (
                "|" + random_pattern(rng, depth + 1) if rng.random() < 0.5 else "") + ")"
        else:
            atom = rng.choice(ATOMS)
        items.append(atom + rng.choice(QUANTIFIERS))
    return "".join(items)


class AgreesWithRe(unittest.TestCase):
    def test_match_or_not(self):
        rng = random.Random(0)
        for _ in range(1500):
            pattern = random_pattern(rng)
            if len(pattern) > 22:              # re itself backtracks for long on some
                continue
            ours, theirs = linear_regex.compile(pattern), re.compile(pattern)
            for _ in range(15):
                text = "".join(rng.choice("abx1.") for _ in range(rng.randint(0, 7)))
                self.assertEqual(ours.fullmatch(text) is None, theirs.fullmatch(text) is None,
                                 (pattern, text))

    def test_groups_are_re_s_leftmost_first(self):
        """Groups as in re (patterns with empty-matching loops inside loops aside)."""
        rng = random.Random(1)
        for _ in range(1500):
            first, second = random_pattern(rng), random_pattern(rng)
            if len(first) + len(second) > 22 or "*?)+" in first + second \
                    or "*)" in first + second:
                continue
            theirs = re.compile(f"(?P<g>{first})(?P<h>{second})")
            ours = linear_regex.Regex(linear_regex.sequence([
                linear_regex.group("g", linear_regex.parse(first)),
                linear_regex.group("h", linear_regex.parse(second))]))
            for _ in range(15):
                text = "".join(rng.choice("abx1") for _ in range(rng.randint(0, 7)))
                match = theirs.fullmatch(text)
                self.assertEqual(ours.fullmatch(text), match and match.groupdict(),
                                 (first, second, text))

    def test_anchors_escapes_and_classes(self):
        for pattern, text in [("^a$", "a"), (r"\Aa\Z", "a"), (r"\x41\u00e9", "Aé"),
                              (r"[\]a-]+", "]-a"), (r"[^\d]", "x"), ("a{,2}", "aa"),
                              ("a{x}", "a{x}"), (r"\W\S", "-x"), ("é+", "éé")]:
            self.assertEqual(linear_regex.compile(pattern).fullmatch(text) is not None,
                             re.fullmatch(pattern, text) is not None, pattern)


class Refusals(unittest.TestCase):
    def test_what_is_refused_and_why(self):
        for pattern, why in [(r"(a)\1", "backreferences"), ("(?P=x)", "backreferences"),
                             ("(?=a)", "lookaround"), ("(?<!a)b", "lookaround"),
                             ("(?P<x>a)", "named groups"), ("(?>a)", "atomic"),
                             ("a++", "possessive"), ("(?i)a", "inline flags"),
                             (r"\bx", "unsupported escape"), ("a**", "multiple repeat"),
                             ("*a", "nothing to repeat"), ("(a", "missing \\)"),
                             ("a)", "unbalanced"), ("[a", "unterminated"), ("[b-a]", "range"),
                             ("a{2000}", "above 1000"), ("a{3,2}", "min repeat"),
                             ("(" * 200 + ")" * 200, "nested"), ("(?:a{1000}){1000}", "too large")]:
            with self.subTest(pattern=pattern[:20]):
                with self.assertRaisesRegex(linear_regex.RegexError, why):
                    linear_regex.compile(pattern)
        with self.assertRaisesRegex(linear_regex.RegexError, "a regex must be a string, got int"):
            linear_regex.compile(5)


class LinearTime(unittest.TestCase):
    def test_catastrophic_patterns_run_at_once(self):
        for pattern in ["(a+)+b", "(a|aa)+b", "(a*)*b", "(.*a){12}x", r"(\w+\s?)+$x"]:
            start = time.perf_counter()
            self.assertIsNone(linear_regex.compile(pattern).fullmatch("a" * 3000))
            self.assertLess(time.perf_counter() - start, 5, pattern)


if __name__ == "__main__":
    unittest.main()
