"""Diagnostics: every user-facing error carries a source position and a hint.

Errors are collected, not raised one at a time, so a file with several
mistakes reports them all at once (as miniwdl does). ``SpecError`` is the only
exception the spec and compiler stages raise for bad input; the CLI prints
``render()`` and exits 1, never a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

from mixc.core.errors import MixcError


@dataclass(frozen=True)
class Pos:
    """A span in a source file (1-based lines and columns, end exclusive)."""

    file: str
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None


@dataclass(frozen=True)
class Diagnostic:
    message: str
    pos: Pos | None = None
    hint: str | None = None
    severity: str = "error"

    def render(self, sources: dict[str, str] | None = None) -> str:
        if self.pos is None:
            head = f"mixc: {self.severity}: {self.message}"
            return head + (f"\n  hint: {self.hint}" if self.hint else "")
        p = self.pos
        lines = [f"{p.file}:{p.line}:{p.col}: {self.severity}: {self.message}"]
        text = (sources or {}).get(p.file)
        if text is not None:
            src_lines = text.split("\n")  # as Lark counts lines (a lone \r is not a break)
            if 1 <= p.line <= len(src_lines):
                src = src_lines[p.line - 1].expandtabs(1)
                width = 1
                if p.end_line == p.line and p.end_col and p.end_col > p.col:
                    width = p.end_col - p.col
                width = max(1, min(width, len(src) - p.col + 2))
                gutter = f"{p.line:>5} | "
                lines.append(gutter + src)
                lines.append(" " * (len(gutter) + p.col - 1) + "^" * width)
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


class SpecError(MixcError):
    """One or more diagnostics about a spec. ``render()`` gives the report."""

    def __init__(self, diagnostics: Iterable[Diagnostic], sources: dict[str, str] | None = None):
        # In source order, so a report reads top to bottom (files in order of first mention).
        diags = list(diagnostics)
        files = {d.pos.file: i for i, d in reversed(list(enumerate(diags))) if d.pos}
        self.diagnostics = sorted(
            diags,
            key=lambda d: (0, files[d.pos.file], d.pos.line, d.pos.col) if d.pos else (1, 0, 0, 0),
        )
        self.sources = dict(sources or {})
        super().__init__(self.render())

    def render(self) -> str:
        parts = [d.render(self.sources) for d in self.diagnostics]
        n = len(self.diagnostics)
        if n > 1:
            parts.append(f"{n} errors")
        return "\n".join(parts)


@dataclass
class Diagnostics:
    """A collector: stages add to it and call ``raise_if_any`` at their end."""

    sources: dict[str, str] = field(default_factory=dict)
    items: list[Diagnostic] = field(default_factory=list)

    def error(self, message: str, pos: Pos | None = None, hint: str | None = None) -> None:
        # One report per source position: a block used many times repeats its errors.
        if pos is not None and any(d.pos == pos for d in self.items):
            return
        d = Diagnostic(message, pos, hint)
        if d not in self.items:
            self.items.append(d)

    def extend(self, err: SpecError) -> None:
        self.sources.update(err.sources)
        for d in err.diagnostics:
            if d not in self.items:
                self.items.append(d)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise SpecError(self.items, self.sources)


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A hint naming the closest candidates to a misspelt ``word``, if any."""
    cands = sorted(set(candidates))
    close = difflib.get_close_matches(word, cands, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    return None


def choices_hint(word: str, candidates: Iterable[str]) -> str:
    """``did_you_mean`` or, failing that, the list of valid names."""
    cands = sorted(set(candidates))
    return did_you_mean(word, cands) or ("expected one of: " + ", ".join(cands))
