"""The compiler: elaborate the backbone, group layers, allocate the budget,
assign templates, and emit a ``Plan``. Pure Python: no torch or jax imports."""

from mixc.compiler.compile import compile_program
from mixc.compiler.plan import PLAN_VERSION, Plan

__all__ = ["compile_program", "Plan", "PLAN_VERSION"]
