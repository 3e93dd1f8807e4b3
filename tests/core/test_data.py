"""Datasets: digits split, cifar archives, .npz files, and the errors for bad input."""

import pickle

import numpy as np
import pytest

from mixc.core.data import DataError, check_compatible, load_dataset, shard


def test_digits_fixed_split_normalised():
    a = load_dataset("digits")
    b = load_dataset("digits")
    assert a.x_train.shape[1:] == (1, 8, 8) and a.x_train.dtype == np.float32
    assert a.y_train.dtype == np.int64 and a.classes == 10
    assert len(a.y_train) + len(a.y_test) == 1797 and 350 <= len(a.y_test) <= 370
    np.testing.assert_array_equal(a.x_test, b.x_test)  # deterministic
    assert abs(float(a.x_train.mean())) < 1e-5 and abs(float(a.x_train.std()) - 1) < 1e-4
    assert np.bincount(a.y_test).min() >= 30  # stratified
    check_compatible(a, [1, 8, 8], 10)


def _write_cifar(root, n_train=4, n_test=2, classes=10, missing=()):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if name in missing:
            continue
        n = n_test if name == "test_batch" else n_train
        d = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, classes, n)),
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    return folder


def test_cifar10_from_pickles(tmp_path):
    _write_cifar(tmp_path)
    d = load_dataset("cifar10", data_dir=tmp_path)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (2, 3, 32, 32)
    assert d.classes == 10
    np.testing.assert_allclose(d.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    # pointing at the unpacked folder itself works too
    assert load_dataset("cifar10", data_dir=tmp_path / "cifar-10-batches-py").x_train.shape[0] == 20


def test_cifar_missing_folder_and_files(tmp_path):
    with pytest.raises(
        DataError, match=r"cifar-10-batches-py.*data_batch_1.*test_batch.*cs.toronto.edu"
    ):
        load_dataset("cifar10", data_dir=tmp_path)
    _write_cifar(tmp_path, missing=("data_batch_3",))
    with pytest.raises(DataError, match="lacks data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder = _write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((1, 3072)), b"labels": [print]})
    )
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


def _npz(path, **over):
    arrays = dict(
        x_train=np.zeros((6, 1, 8, 8), np.float32),
        y_train=np.arange(6) % 3,
        x_test=np.zeros((3, 1, 8, 8), np.float32),
        y_test=np.arange(3),
    )
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_roundtrip(tmp_path):
    d = load_dataset(str(_npz(tmp_path / "toy.npz")))
    assert d.name == "toy" and d.classes == 3 and d.x_train.dtype == np.float32
    check_compatible(d, [1, 8, 8], 10)


def test_npz_errors(tmp_path):
    with pytest.raises(DataError, match=r"no dataset file .*nope\.npz"):
        load_dataset(str(tmp_path / "nope.npz"))
    with pytest.raises(DataError, match="lacks the arrays y_test"):
        load_dataset(str(_npz(tmp_path / "a.npz", y_test=None)))
    with pytest.raises(DataError, match=r"y_train has shape \[6, 3\]"):
        load_dataset(str(_npz(tmp_path / "b.npz", y_train=np.zeros((6, 3)))))
    with pytest.raises(DataError, match="non-integer"):
        load_dataset(str(_npz(tmp_path / "c.npz", y_train=np.full(6, 0.5))))
    bad = tmp_path / "d.npz"
    bad.write_text("not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(bad))
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_check_compatible_shapes_and_labels(tmp_path):
    d = load_dataset(
        str(_npz(tmp_path / "e.npz", x_train=np.zeros((6, 8, 8)), x_test=np.zeros((3, 8, 8))))
    )
    with pytest.raises(DataError, match=r"shape \[8, 8\] but the spec's input is \[1, 8, 8\]"):
        check_compatible(d, [1, 8, 8], 10)
    d = load_dataset(str(_npz(tmp_path / "f.npz", y_test=np.array([0, 1, 12]))))
    with pytest.raises(DataError, match="label 12, outside 0..9"):
        check_compatible(d, [1, 8, 8], 10)


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (1, 2), (128, 4)])
def test_shard_tiles(n, world):
    parts = [list(range(n))[shard(n, r, world)] for r in range(world)]
    assert sum(parts, []) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize(
    "arrays,message",
    [
        (
            dict(x_train=np.zeros((0, 1, 8, 8)), y_train=np.zeros(0, np.int64)),
            r"x_train holds no samples",
        ),
        (
            dict(x_test=np.zeros((0, 1, 8, 8)), y_test=np.zeros(0, np.int64)),
            r"x_test holds no samples",
        ),
        (
            dict(y_train=np.array([0, 1, 2, 1e30, 0, 1])),
            r"y_train\[3\] = 1e\+30 is not a class index",
        ),
        (dict(y_test=np.array([0, -2, 1])), r"y_test\[1\] = -2 is not a class index \(negative\)"),
        (
            dict(y_train=np.array([0, 1, np.nan, 1, 0, 1])),
            r"y_train\[2\] = nan is not a class index",
        ),
    ],
)
def test_npz_empty_splits_and_bad_labels_name_array_index_and_value(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message) as e:
        load_dataset(str(_npz(tmp_path / "bad.npz", **arrays)))
    assert "bad.npz" in str(e.value) and "hint" in str(e.value)


def test_npz_inputs_must_be_finite_and_of_sane_magnitude(tmp_path):
    x = np.zeros((6, 1, 8, 8))
    x[4, 0, 2, 5] = 1e300  # finite in float64, infinite once cast to float32
    with pytest.raises(
        DataError, match=r"x_train\[4, 0, 2, 5\] = 1e\+300 is beyond \+-1e\+06.*normalised"
    ):
        load_dataset(str(_npz(tmp_path / "big.npz", x_train=x)))
    x = np.zeros((3, 1, 8, 8), np.float32)
    x[1, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"x_test\[1, 0, 0, 0\] = inf is not a finite number"):
        load_dataset(str(_npz(tmp_path / "inf.npz", x_test=x)))


def test_cli_reports_an_empty_split_without_a_traceback(tmp_path, capsys):
    pytest.importorskip("torch")
    from mixc.commands import train as cmd

    path = _npz(
        tmp_path / "empty.npz", x_train=np.zeros((0, 1, 8, 8)), y_train=np.zeros(0, np.int64)
    )
    code = cmd.main(["digits", "--data", str(path), "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "x_train holds no samples" in err and "Traceback" not in err


def _mapped(a: np.ndarray) -> bool:
    """Whether ``a``'s memory is a file mapping (np.load's mmap_mode arrays, or ours from a
    .npz)."""
    import mmap

    while a is not None:
        if isinstance(a, mmap.mmap):
            return True
        a = getattr(a, "base", None)
    return False


def test_npz_stored_uncompressed_is_memory_mapped(tmp_path):
    """np.savez members are mapped from the file (float32 ones stay mapped through loading);
    compressed ones and other orders or dtypes are read as before; every value is the stored one."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 1, 8, 8)).astype(np.float32)
    y = np.arange(20) % 3
    plain, packed, fortran = (
        tmp_path / "plain.npz",
        tmp_path / "packed.npz",
        tmp_path / "fortran.npz",
    )
    np.savez(plain, x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    np.savez_compressed(packed, x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    np.savez(
        fortran,
        x_train=np.asfortranarray(x.astype(np.float64)),
        y_train=y,
        x_test=x[:5],
        y_test=y[:5],
    )
    d = load_dataset(str(plain))
    assert _mapped(d.x_train) and _mapped(d.x_test) and not d.x_train.flags.writeable
    for path in (plain, packed, fortran):
        d = load_dataset(str(path))
        np.testing.assert_array_equal(d.x_train, x)
        np.testing.assert_array_equal(d.y_train, y)
        assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert not _mapped(load_dataset(str(packed)).x_train)


def test_mapped_inputs_are_checked_in_chunks(tmp_path, monkeypatch):
    """The finiteness check walks a large array a chunk at a time and still names the first bad
    value."""
    from mixc.core import data

    monkeypatch.setattr(data, "_CHECK_BYTES", 3 * 64 * 4)  # 3 samples per chunk
    x = np.zeros((10, 1, 8, 8), np.float32)
    x[7, 0, 3, 1] = x[9, 0, 0, 0] = np.nan  # chunks: rows 0-2, 3-5, 6-8, 9
    with pytest.raises(
        DataError, match=r"x_train\[7, 0, 3, 1\] = nan is not a finite number \(1 or more such"
    ):
        load_dataset(str(_npz(tmp_path / "nan.npz", x_train=x, y_train=np.zeros(10, np.int64))))


def test_torch_trains_from_the_mapped_file(tmp_path):
    """On CPU the torch trainer gathers batches straight from the mapped array (no copy, no warning
    about its read-only memory); gathering in host memory and copying each batch over (the path
    for a training set too big for the accelerator) gives the same step."""
    pytest.importorskip("torch")
    import warnings

    import mixc
    from mixc.backends import get_backend
    from mixc.backends.torch import train as torch_train
    from mixc.spec.recipe import Recipe

    digits = load_dataset("digits")
    path = tmp_path / "digits.npz"
    np.savez(
        path,
        x_train=digits.x_train,
        y_train=digits.y_train,
        x_test=digits.x_test,
        y_test=digits.y_test,
    )
    d = load_dataset(str(path))
    plan = mixc.compile("digits", ["backbone.width=4", "members=2"])
    recipe = Recipe.model_validate(plan.train)
    weights = []
    for on_host in (False, True):
        t = get_backend("torch").trainer(plan, recipe, device="cpu", layout="auto", augment="none")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            t.begin(d.x_train, d.y_train, 64)
            assert np.shares_memory(t.x_train.numpy(), d.x_train)
            t.x_on_host = on_host
            t.begin_epoch(1, 2)
            t.step(np.arange(64), 0.1, 0)
            assert t.predict(d.x_test).shape == (len(d.y_test), 2, 10)
        weights.append(t.state_arrays())
        t.close()
    for k in weights[0]:
        np.testing.assert_array_equal(weights[0][k], weights[1][k], err_msg=k)
    # CPU: the host is the device
    assert torch_train._fits_on_device(1 << 40, torch_train.torch.device("cpu"))


def test_npz_may_hold_its_own_validation_split(tmp_path):
    """x_val/y_val in the file are the validation split (so a large mapped set need not be split in
    memory)."""
    from mixc.core.data import split_validation

    x = np.zeros((4, 1, 8, 8), np.float32)
    d = load_dataset(str(_npz(tmp_path / "v.npz", x_val=x, y_val=np.array([0, 1, 2, 3]))))
    assert d.x_val.shape == (4, 1, 8, 8) and list(d.y_val) == [0, 1, 2, 3] and d.classes == 4
    assert _mapped(d.x_val) and "4 val" in d.description
    with pytest.raises(DataError, match="own validation split"):
        split_validation(d, 0.2, 0)
    with pytest.raises(DataError, match="holds x_val but not y_val"):
        load_dataset(str(_npz(tmp_path / "w.npz", x_val=x)))
    with pytest.raises(DataError, match=r"x_val samples \[2, 8, 8\]"):
        load_dataset(str(_npz(tmp_path / "s.npz", x_val=np.zeros((4, 2, 8, 8)), y_val=np.zeros(4))))
