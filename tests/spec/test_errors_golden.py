"""Golden error reports for typical mistakes (regenerate: MIXC_UPDATE_GOLDEN=1 pytest
tests/spec/test_errors_golden.py)."""

import os

import pytest
from paths import GOLDEN

from mixc.cli import main

HERE = GOLDEN / "errors"
CASES = sorted(p.stem for p in HERE.glob("*.mix") if p.stem != "cycle_b")


@pytest.mark.parametrize("case", CASES)
def test_golden_error_report(case, capsys, monkeypatch):
    monkeypatch.chdir(HERE)
    rc = main(["check", f"{case}.mix"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    golden = HERE / f"{case}.txt"
    if os.environ.get("MIXC_UPDATE_GOLDEN"):
        golden.write_text(err)
    assert err == golden.read_text()
