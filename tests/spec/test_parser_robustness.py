"""Any input gives a plan or a SpecError whose positions point inside the file: never a
traceback."""

import os
from functools import cache

import lark
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark

import mixc
from mixc.spec import SpecError
from mixc.spec.loader import zoo_specs
from mixc.spec.parser import grammar_text

NAME = "fuzz.mix"
SCALE = int(os.environ.get("MIXC_FUZZ_SCALE", "1"))  # raise for a long fuzzing run


def _compile_or_spec_error(text: str) -> None:
    try:
        mixc.compile_text(text, name=NAME)
    except SpecError as err:
        lines = text.split("\n")  # as Lark counts lines
        assert err.diagnostics
        for d in err.diagnostics:
            assert d.message
            if d.pos is None or d.pos.file != NAME:
                continue
            assert 1 <= d.pos.line <= len(lines) + 1, d
            assert 1 <= d.pos.col <= len(lines[min(d.pos.line, len(lines)) - 1]) + 2, d
        err.render()  # rendering never fails either


@cache
def _grammar() -> lark.Lark:
    return lark.Lark(grammar_text(), parser="lalr", start="start")


@settings(max_examples=80 * SCALE)
@given(st.data())
def test_strings_from_the_grammar(data):
    text = data.draw(from_lark(_grammar()))
    _compile_or_spec_error(text)


def _tokens(text: str) -> list[str]:
    import re

    return re.findall(r'"[^"\n]*"|\d+\.?\d*[KMGx]?|\w+|\S|\n', text)


ZOO = {p.stem: p.read_text() for p in zoo_specs()}
ZOO["blocks/wide"] = (zoo_specs()[0].parent / "blocks" / "wide.mix").read_text()


@settings(max_examples=200 * SCALE)
@given(st.sampled_from(sorted(ZOO)), st.data())
def test_mutated_zoo_files(name, data):
    toks = _tokens(ZOO[name])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(toks) - 1))
        op = data.draw(st.sampled_from(["delete", "duplicate", "swap", "number", "word"]))
        if op == "delete":
            del toks[i]
        elif op == "duplicate":
            toks.insert(i, toks[i])
        elif op == "swap" and i + 1 < len(toks):
            toks[i], toks[i + 1] = toks[i + 1], toks[i]
        elif op == "number":
            toks[i] = data.draw(
                st.sampled_from(["0", "-1", "3", "2.5", "1000000000", "1e400", "0.5x", "7K"])
            )
        elif op == "word":
            toks[i] = data.draw(
                st.sampled_from(
                    [
                        "conv",
                        "bn",
                        "repeat",
                        "stage",
                        "residual",
                        "x",
                        "{",
                        "}",
                        "(",
                        "=",
                        ";",
                        '"*"',
                        "true",
                        "budget",
                        "members",
                    ]
                )
            )
    text = " ".join(toks).replace(" \n ", "\n")
    _compile_or_spec_error(text)


# --- --set values and lets built from expression atoms and operators: a SpecError, and fast
# ------------

_NUMBERS = st.sampled_from(
    [
        "0",
        "1",
        "2",
        "3",
        "9",
        "10",
        "36",
        "-1",
        "0.5",
        "1e17",
        "1e-300",
        "1e999",
        "9" * 25,
        "9" * 5000,
        "36.5M",
        "7K",
        "1G",
        "0.0x",
        "1.0x",
    ]
)
_OTHERS = st.sampled_from(['"a"', '"*"', "true", "false", "members", "width", "x", "[1, 2]", "[]"])
_ATOMS = st.one_of(_NUMBERS, _NUMBERS, _NUMBERS, _OTHERS)  # mostly numbers, so operators get to run


def _combine(children):
    ops = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "**", "==", "<", "and", "or"])
    binary = st.tuples(children, ops, children).map(lambda t: f"{t[0]} {t[1]} {t[2]}")
    return st.one_of(  # mostly binary operators: that is where the bombs are
        binary,
        binary,
        binary,
        binary,
        binary,
        children.map(lambda e: f"({e})"),
        children.map(lambda e: f"-{e}"),
        children.map(lambda e: f"not {e}"),
        st.tuples(children, children, children).map(lambda t: f"{t[0]} if {t[1]} else {t[2]}"),
        st.tuples(st.sampled_from(["sgd", "f", "cosine"]), children).map(
            lambda t: f"{t[0]}(lr = {t[1]})"
        ),
        st.tuples(children, children).map(lambda t: f"[{t[0]}, {t[1]}]"),
    )


EXPRESSIONS = st.recursive(_ATOMS, _combine, max_leaves=8)
# Not budget: how fast a huge budget allocates is the allocator's property
# (tests/compiler/test_allocation_properties.py).
KEYS = [
    "members",
    "templates_per_layer",
    "backbone.width",
    "backbone.classes",
    "train.optimizer.lr",
    "train.epochs",
    "train.batch",
    "train.optimizer",
    "assign",
    "groups",
]


class _TooSlow(Exception):
    pass


def _fast_spec_error_or_plan(compile_it) -> None:
    """``compile_it()`` gives a plan or a SpecError within 2 s (a hang is cut at 5 s and fails)."""
    import signal
    import time

    def stop(signum, frame):
        raise _TooSlow("still compiling after 5 s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    start = time.perf_counter()
    try:
        compile_it()
    except SpecError as err:
        assert err.diagnostics and all(d.message for d in err.diagnostics)
        err.render()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"took {elapsed:.2f}s"


# Known bombs, always tried first: each once hung or raised a traceback.
BOMBS = [
    "9**9**9",
    "10**10**10",
    "3**36.5M",
    "0**-1",
    "1e17//1e-300",
    "sgd()",
    "(-8)**0.5",
    "9" * 5000,
]


def _bombs(test):
    for bomb in BOMBS:
        test = example("train.optimizer.lr" if bomb == "sgd()" else "members", bomb, "2")(test)
    return test


@settings(max_examples=150 * SCALE)
@_bombs
@given(st.sampled_from(KEYS), EXPRESSIONS, EXPRESSIONS)
def test_random_set_values_give_a_plan_or_a_spec_error_quickly(key, value, other):
    _fast_spec_error_or_plan(lambda: mixc.compile("digits", [f"{key}={value}", f"members={other}"]))


@settings(max_examples=60 * SCALE)
@given(EXPRESSIONS)
@example("9**9**9")
@example("3**36.5M")
@example("0**-1")
def test_random_lets_give_a_plan_or_a_spec_error_quickly(value):
    text = ZOO["digits"].replace(
        "# digits.mix", f"let v = {value}\nlet w = [v, v]\n# digits.mix", 1
    )
    _fast_spec_error_or_plan(lambda: mixc.compile_text(text, name=NAME))
