"""Real Python code available offline for code-agent repair tasks: pure-Python standard-library modules, with
per-function adapters and input generators. The expected outputs of the hidden tests are recorded by running the
pristine module (differential tests, as SWE-smith does for procedurally injected bugs).

Only modules that neither the interpreter's startup nor the test harness import are used, so the repository's
copy is the one under test and the pristine copy can be hidden from the sandbox.
"""
from __future__ import annotations

import random

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
         "sigma", "omega", "a", "an", "the", "supercalifragilistic", "x", "hyphen-ated", "end."]


def _text(rng: random.Random, lo: int = 3, hi: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _indented(rng: random.Random) -> str:
    pad = " " * rng.randint(0, 6)
    lines = [pad + " " * rng.choice([0, 0, 2, 4]) + _text(rng, 1, 5) for _ in range(rng.randint(2, 5))]
    if rng.random() < 0.3:
        lines.insert(rng.randint(0, len(lines)), "")
    return "\n".join(lines) + ("\n" if rng.random() < 0.5 else "")


def _shell(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 6)):
        w = rng.choice(WORDS)
        parts.append(rng.choice([w, f"'{w} {w}'", f'"{w}\\"q"', f"{w}\\ x", f"--{w}={w}", "#c" if rng.random() < 0.1 else w]))
    return " ".join(parts)


def _nums(rng: random.Random, n: int | None = None, pos: bool = False) -> list:
    n = n or rng.randint(1, 9)
    return [rng.randint(1 if pos else -20, 40) if rng.random() < 0.7 else round(rng.uniform(0.5 if pos else -5, 50), 3) for _ in range(n)]


def _dag(rng: random.Random) -> dict:
    nodes = [f"n{i}" for i in range(rng.randint(2, 8))]
    g = {n: sorted({m for m in nodes[:i] if rng.random() < 0.4}) for i, n in enumerate(nodes)}
    if rng.random() < 0.2 and len(nodes) > 2:
        g[nodes[0]] = [nodes[-1]]          # a cycle
    return g


# module -> function label -> (adapter: a lambda, or a `def run`, taking the module `m` and the case's args;
#                              input generator)
TARGETS: dict[str, dict[str, tuple[str, object]]] = {
    "textwrap": {
        "wrap": ("lambda m, t, w: m.wrap(t, width=w)", lambda r: [_text(r), r.randint(4, 30)]),
        "fill": ("lambda m, t, w: m.fill(t, width=w, initial_indent='> ')", lambda r: [_text(r), r.randint(6, 30)]),
        "shorten": ("lambda m, t, w: m.shorten(t, width=w, placeholder=' [...]')", lambda r: [_text(r), r.randint(8, 60)]),
        "dedent": ("lambda m, t: m.dedent(t)", lambda r: [_indented(r)]),
        "indent": ("lambda m, t, p: m.indent(t, p)", lambda r: [_indented(r), r.choice(["> ", "  ", "# "])]),
    },
    "colorsys": {
        "rgb_to_hsv": ("lambda m, *c: [round(v, 9) for v in m.rgb_to_hsv(*c)]", lambda r: [round(r.random(), 3) for _ in range(3)]),
        "hsv_to_rgb": ("lambda m, *c: [round(v, 9) for v in m.hsv_to_rgb(*c)]", lambda r: [round(r.random(), 3) for _ in range(3)]),
        "rgb_to_hls": ("lambda m, *c: [round(v, 9) for v in m.rgb_to_hls(*c)]", lambda r: [round(r.random(), 3) for _ in range(3)]),
        "hls_to_rgb": ("lambda m, *c: [round(v, 9) for v in m.hls_to_rgb(*c)]", lambda r: [round(r.random(), 3) for _ in range(3)]),
        "rgb_to_yiq": ("lambda m, *c: [round(v, 9) for v in m.rgb_to_yiq(*c)]", lambda r: [round(r.random(), 3) for _ in range(3)]),
        "yiq_to_rgb": ("lambda m, *c: [round(v, 9) for v in m.yiq_to_rgb(*c)]", lambda r: [round(r.random(), 3), round(r.uniform(-.5, .5), 3), round(r.uniform(-.5, .5), 3)]),
    },
    "shlex": {
        "split": ("lambda m, s: m.split(s, comments=True)", lambda r: [_shell(r)]),
        "quote": ("lambda m, s: m.quote(s)", lambda r: [r.choice(["", "plain", "two words", "it's", "a$b", "x\"y", _text(r, 1, 3)])]),
        "join": ("lambda m, *a: m.join(a)", lambda r: [r.choice(WORDS + ["two words", "", "it's"]) for _ in range(r.randint(1, 4))]),
    },
    "statistics": {
        "mean": ("lambda m, *x: round(float(m.mean(x)), 9)", lambda r: _nums(r)),
        "median": ("lambda m, *x: m.median(x)", lambda r: _nums(r)),
        "median_low": ("lambda m, *x: m.median_low(x)", lambda r: _nums(r)),
        "median_high": ("lambda m, *x: m.median_high(x)", lambda r: _nums(r)),
        "mode": ("lambda m, *x: m.mode(x)", lambda r: [r.randint(0, 4) for _ in range(r.randint(1, 9))]),
        "pvariance": ("lambda m, *x: round(float(m.pvariance(x)), 9)", lambda r: _nums(r)),
        "stdev": ("lambda m, *x: round(float(m.stdev(x)), 9)", lambda r: _nums(r, r.randint(2, 9))),
        "quantiles": ("lambda m, *x: [round(float(q), 9) for q in m.quantiles(x, n=4)]", lambda r: _nums(r, r.randint(2, 9))),
        "harmonic_mean": ("lambda m, *x: round(float(m.harmonic_mean(x)), 9)", lambda r: _nums(r, None, True)),
        "geometric_mean": ("lambda m, *x: round(float(m.geometric_mean(x)), 9)", lambda r: _nums(r, None, True)),
    },
    "fractions": {
        "add": ("lambda m, a, b, c, d: str(m.Fraction(a, b) + m.Fraction(c, d))", lambda r: [r.randint(-30, 30), r.randint(1, 30), r.randint(-30, 30), r.randint(1, 30)]),
        "mul": ("lambda m, a, b, c, d: str(m.Fraction(a, b) * m.Fraction(c, d))", lambda r: [r.randint(-30, 30), r.randint(1, 30), r.randint(-30, 30), r.randint(1, 30)]),
        "limit_denominator": ("lambda m, a, b, n: str(m.Fraction(a, b).limit_denominator(n))", lambda r: [r.randint(1, 10 ** 5), r.randint(1, 10 ** 5), r.randint(1, 50)]),
        "from_string": ("lambda m, s: str(m.Fraction(s))", lambda r: [r.choice([f"{r.randint(-99, 99)}/{r.randint(1, 99)}", f"{r.uniform(-9, 9):.3f}", f"{r.randint(1, 9)}e-{r.randint(1, 3)}"])]),
        "compare": ("lambda m, a, b, c, d: [m.Fraction(a, b) < m.Fraction(c, d), m.Fraction(a, b) == m.Fraction(c, d)]", lambda r: [r.randint(-9, 9), r.randint(1, 9), r.randint(-9, 9), r.randint(1, 9)]),
        "round": ("lambda m, a, b, n: str(round(m.Fraction(a, b), n))", lambda r: [r.randint(-999, 999), r.randint(1, 99), r.randint(0, 3)]),
    },
    "calendar": {
        "monthrange": ("lambda m, y, mo: list(m.monthrange(y, mo))", lambda r: [r.randint(1890, 2110), r.randint(1, 12)]),
        "isleap": ("lambda m, y: m.isleap(y)", lambda r: [r.choice([r.randint(1600, 2400), 1900, 2000, 2100, 2024])]),
        "leapdays": ("lambda m, a, b: m.leapdays(a, b)", lambda r: [r.randint(1500, 2000), r.randint(2000, 2500)]),
        "weekday": ("lambda m, y, mo, d: m.weekday(y, mo, d)", lambda r: [r.randint(1900, 2100), r.randint(1, 12), r.randint(1, 28)]),
        "monthcalendar": ("lambda m, y, mo: m.monthcalendar(y, mo)", lambda r: [r.randint(1900, 2100), r.randint(1, 12)]),
        "month": ("lambda m, y, mo: m.TextCalendar(m.MONDAY).formatmonth(y, mo)", lambda r: [r.randint(1900, 2100), r.randint(1, 12)]),
    },
    "graphlib": {
        "static_order": ("lambda m, g: list(m.TopologicalSorter(g).static_order())", lambda r: [_dag(r)]),
        "ready_batches": ("def run(m, g):\n    ts = m.TopologicalSorter(g)\n    ts.prepare()\n    out = []\n"
                          "    while ts.is_active():\n        b = sorted(ts.get_ready())\n        out.append(b)\n"
                          "        ts.done(*b)\n    return out", lambda r: [_dag(r)]),
    },
    "string": {
        "capwords": ("lambda m, s, sep: m.capwords(s, sep)", lambda r: [_text(r, 1, 8), r.choice([None, " ", "-"])]),
        "template": ("lambda m, t, kw: m.Template(t).safe_substitute(kw)", lambda r: [r.choice(["$a and ${b}", "$$a $a$b", "${a}x $c", "$ a", "$a$"]),
                                                                                       {"a": r.choice(WORDS), "b": str(r.randint(0, 9))}]),
        "formatter": ("lambda m, f, kw: m.Formatter().vformat(f, (), kw)", lambda r: [r.choice(["{a}-{b!r:>6}", "{a:^9}|{b}", "{{a}} {a!s}", "{b:0>4}"]),
                                                                                        {"a": r.choice(WORDS), "b": r.randint(0, 999)}]),
    },
}


def cases_for(module: str, func: str, rng: random.Random, n: int) -> list[list]:
    return [TARGETS[module][func][1](rng) for _ in range(n)]


def adapter(module: str, func: str) -> str:
    return TARGETS[module][func][0]

