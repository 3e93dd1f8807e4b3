import importlib.util
import os
import sys
import tempfile

import pytest

# shared helpers: `import strategies`
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))

# Without mixc's own dependencies nothing here can import: say so once, with the fix, instead of one
# collection traceback per test file. (Tests of an optional extra skip when it is not installed.)
_CORE = ("lark", "pydantic", "rich", "numpy", "hypothesis")
_MISSING = [name for name in _CORE if importlib.util.find_spec(name) is None]


def pytest_configure(config: pytest.Config) -> None:
    if _MISSING:
        pytest.exit(
            f"mixc's dependencies are not installed in this Python ({sys.executable}): missing"
            f" {', '.join(_MISSING)}. Install the project first, as the README says: pip install"
            " torch==2.13.0 && pip install -e '.[torch,flax,plot,dev,export,log,images]' (or run"
            " bash .ci/run, which does it in a fresh .venv and then runs the tests)",
            returncode=4,
        )


if not _MISSING:
    from hypothesis import HealthCheck, settings

    # CI runs on 2 cores: bounded, deterministic example counts (derandomized so a run is
    # reproducible).
    settings.register_profile(
        "ci",
        max_examples=60,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile("dev", max_examples=300, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Built models are imported from the compiled-model cache (backends/generated.py): keep the tests'
# own.
if "MIXC_CACHE_DIR" not in os.environ:
    os.environ["MIXC_CACHE_DIR"] = tempfile.mkdtemp(prefix="mixc-test-cache-")
