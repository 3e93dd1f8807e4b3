"""Where the tests find the repository, its zoo and the golden files, wherever a test file sits."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
ZOO = REPO / "zoo"
GOLDEN = TESTS / "golden"
SUPPORT = TESTS / "support"
