"""Any input gives a plan or a SpecError whose positions point inside the file: never a traceback."""

import os
from functools import lru_cache

import lark
from hypothesis import given, settings
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


@lru_cache(maxsize=None)
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
            toks[i] = data.draw(st.sampled_from(["0", "-1", "3", "2.5", "1000000000", "1e400", "0.5x", "7K"]))
        elif op == "word":
            toks[i] = data.draw(st.sampled_from(["conv", "bn", "repeat", "stage", "residual", "x", "{", "}", "(",
                                                 "=", ";", '"*"', "true", "budget", "members"]))
    text = " ".join(toks).replace(" \n ", "\n")
    _compile_or_spec_error(text)
