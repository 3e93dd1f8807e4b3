"""The compiled-model cache runs nothing planted in it: not a stale or planted bytecode
file, not a package folder, not a shared folder's files; a damaged cache file is rewritten, not a
traceback."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import mixc
from mixc.backends import generated

OVERRIDES = {"members": 2, "backbone.width": 8}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("MIXC_CACHE_DIR", str(folder))
    return folder


def _built() -> tuple[object, str, Path]:
    """A model built in the current cache: (model, its module name, the cached .py)."""
    model = mixc.build("digits", overrides=OVERRIDES)
    name = type(model).__module__
    return model, name, Path(generated.cache_dir()) / (name.rsplit(".", 1)[1] + ".py")


def _forget(name: str) -> None:
    sys.modules.pop(name, None)
    importlib.invalidate_caches()


def _payload(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('PWNED')\n"


def _plant_pyc(py: Path, marker: Path) -> Path:
    """Bytecode of the payload stamped with the real file's mtime and size: what the import system
    trusts."""
    from importlib._bootstrap_external import _code_to_timestamp_pyc

    st = py.stat()
    code = compile(_payload(marker), str(py), "exec")
    pyc = Path(importlib.util.cache_from_source(str(py)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(_code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size))
    return pyc


def test_planted_bytecode_beside_the_checked_file_never_runs(cache, tmp_path):
    _, name, py = _built()
    marker = tmp_path / "marker"
    _plant_pyc(py, marker)
    _forget(name)
    model, again, _ = _built()  # the building process
    assert again == name and not marker.exists()
    _forget(name)
    mod = importlib.import_module(name)  # what unpickling in another process does
    assert not marker.exists()
    assert hasattr(mod, type(model).__name__)


def test_a_planted_package_folder_never_runs(cache, tmp_path):
    _, name, py = _built()
    marker = tmp_path / "marker"
    package = py.with_suffix("")
    package.mkdir()
    (package / "__init__.py").write_text(_payload(marker))
    py.unlink()  # without the file, an import would take the folder
    _forget(name)
    _built()
    assert not marker.exists()
    _forget(name)
    importlib.import_module(name)
    assert not marker.exists()


def test_a_planted_module_file_never_runs_in_another_process(cache, tmp_path):
    """Only the cached plan is read (validated, matching the name's hash): a rewritten .py is not
    run."""
    model, name, py = _built()
    marker = tmp_path / "marker"
    py.write_text(_payload(marker))
    _forget(name)
    mod = importlib.import_module(name)
    assert not marker.exists() and hasattr(mod, type(model).__name__)


def test_a_cached_plan_of_another_model_is_refused(cache):
    _, name, py = _built()
    other = mixc.compile("digits", {"members": 3, "backbone.width": 8})
    py.with_name(py.stem + ".plan.json").write_text(other.to_json())
    _forget(name)
    with pytest.raises(ImportError, match="not the one the name says"):
        importlib.import_module(name)


def test_a_cache_others_can_write_is_not_used(cache, tmp_path, capsys):
    os.chmod(cache, 0o777)
    marker = tmp_path / "marker"
    stem = type(mixc.build("digits", members=3, backbone__width=8)).__module__.rsplit(".", 1)[1]
    assert "can be written by other users" in capsys.readouterr().err
    assert not (cache / f"{stem}.py").exists()  # nothing written into the shared folder
    (cache / f"{stem}.py").write_text(_payload(marker))
    _plant_pyc(cache / f"{stem}.py", marker)
    _forget(generated.PACKAGE + "." + stem)
    model = mixc.build("digits", members=3, backbone__width=8)
    assert not marker.exists() and model(torch.zeros(1, 1, 8, 8)).shape[-1] == 10
    with pytest.raises(ImportError, match="is not private"):
        _forget(generated.PACKAGE + "." + stem)
        importlib.import_module(generated.PACKAGE + "." + stem)


def test_a_damaged_cache_file_is_rewritten(cache):
    _, name, py = _built()
    py.write_bytes(b"\xff\xfe not utf-8 \x80")
    _forget(name)
    model, _, _ = _built()
    assert py.read_text() == sys.modules[type(model).__module__].__mixc_source__
