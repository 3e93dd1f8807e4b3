import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # for `import strategies`

# CI runs on 2 cores: bounded, deterministic example counts (derandomized so a run is reproducible).
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Built models are imported from the compiled-model cache (backends/generated.py): keep the tests' own.
if "MIXC_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["MIXC_CACHE_DIR"] = tempfile.mkdtemp(prefix="mixc-test-cache-")
