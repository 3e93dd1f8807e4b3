"""Every zoo plan, under every method and as the plain backbone, keeps its hash and its bytes.

``plan_pins.json`` was written by the code before the method registry, the floors and the
formatter (commit 10f14d0): refactors must leave every plan as it was. A deliberate change to the
Plan regenerates the file (``MIXC_UPDATE_PINS=1``) and says why in its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from paths import REPO, ZOO

import mixc

PINS = Path(__file__).parent / "plan_pins.json"
VARIANTS = [
    (),
    ("method=naive",),
    ("method=batch_ensemble",),
    ("method=mimo",),
    ("method=packed",),
    ("members=1", "groups=none"),
]
CASES = [(s, v) for s in sorted(p.stem for p in ZOO.glob("*.mix")) for v in VARIANTS]


def _fingerprint(spec: str, overrides: tuple[str, ...]) -> list[str]:
    """(spec hash, sha256 of plan.json with the checkout's path masked), or a pinned error."""
    try:
        plan = mixc.compile(spec, list(overrides))
    except Exception as e:  # a method the spec cannot take: its message is pinned too
        text = str(e).replace(str(REPO), "<repo>")
        return ["error", hashlib.sha256(text.encode()).hexdigest()[:16]]
    data = json.loads(plan.to_json().replace(json.dumps(str(REPO))[1:-1], "<repo>"))
    data.pop("source")
    return [plan.spec_hash, hashlib.sha256(json.dumps(data, indent=1).encode()).hexdigest()[:16]]


def test_pins_cover_the_zoo():
    """A new zoo spec is pinned when it is added (MIXC_UPDATE_PINS=1 writes the file)."""
    if os.environ.get("MIXC_UPDATE_PINS") == "1":
        pins = {" ".join((s, *v)): _fingerprint(s, v) for s, v in CASES}
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True))
    assert sorted(json.loads(PINS.read_text())) == sorted(" ".join((s, *v)) for s, v in CASES)


@pytest.mark.parametrize(
    "spec,overrides", CASES, ids=lambda x: " ".join(x) if isinstance(x, tuple) else x
)
def test_plan_matches_its_pin(spec, overrides):
    want = json.loads(PINS.read_text())[" ".join((spec, *overrides))]
    assert _fingerprint(spec, overrides) == want
