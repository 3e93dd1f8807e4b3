"""`mixc import`: plain PyTorch models round-trip into .mix (equal counts, equal logits with the
weights copied), blocks and stages are recovered, what the language lacks is one clear error."""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "support"))

import import_models as M  # noqa: E402

import mixc  # noqa: E402
from mixc.cli import main  # noqa: E402
from mixc.core.module_graph import ImportCheck, ModuleImportError  # noqa: E402
from mixc.importing import check, import_graph  # noqa: E402

MODELS = Path(M.__file__)

CASES = {
    "cnn": (lambda: M.SmallCNN(), [1, 8, 8], []),
    "mlp": (lambda: M.MLP(), [20], []),
    "resnet": (
        lambda: M.ResNet(width=16, num_classes=10),
        [3, 32, 32],
        ["block basic_block(width, stride)", "stage layer1 = repeat 2 basic_block"],
    ),
    "wrn16_4": (
        lambda: M.WideResNet(depth=16, k=4),
        [3, 32, 32],
        ["block wide_basic(width, stride)", "repeat 2 as i wide_basic(width = 128"],
    ),
    "signal": (lambda: M.SignalNet(), [1, 40], ["stage blocks = repeat 3 res_block1d()"]),
}


@pytest.mark.parametrize("case", CASES)
def test_round_trip(case):
    make, shape, wanted = CASES[case]
    module = M.randomised(make())
    imported, plan = import_graph(module, shape, case)
    names, result = check(module, imported, plan, shape)
    assert result.original_params == sum(p.numel() for p in module.parameters())
    assert result.compiled_params == result.original_params == plan.accounting.total_params
    assert result.max_abs_diff <= 1e-5
    for text in wanted:
        assert text in imported.text, imported.text
    # the text is a complete spec: its default ensemble (4 members at 1.0x) compiles too
    assert mixc.compile_text(imported.text).members == 4


def test_resnet_shortcut_and_wrn_count():
    module = M.ResNet(width=16, num_classes=10)
    text = mixc.import_module(module, (3, 32, 32))
    assert "shortcut if stride != 1 or in_channels != width {" in text
    assert "conv downsample_0(width, kernel = 1, stride = stride)" in text
    assert "repeat 2 as i basic_block(width = 32, stride = 2 if i == 0 else 1)" in text
    # the zoo's WRN-16-4 count, reached from the PyTorch model
    plan = mixc.compile_text(mixc.import_module(M.WideResNet(), (3, 32, 32)), ["members=1"])
    assert (
        mixc.compile_text(
            mixc.import_module(M.WideResNet(), (3, 32, 32)), ["members=1", "groups=none"]
        ).accounting.total_params
        == 2_748_890
    )
    assert plan.members == 1


def test_a_wrong_weight_map_is_caught():
    """The check is not a tautology: two swapped weights of one shape show in the logits."""
    module = M.randomised(M.SmallCNN())
    imported, plan = import_graph(module, [1, 8, 8], "cnn")
    a, b = imported.tensors["conv2"], imported.tensors["conv3"]
    imported.tensors["conv2"], imported.tensors["conv3"] = b, a
    _, result = check(module, imported, plan, [1, 8, 8])
    assert result.max_abs_diff > 1e-3


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_writes_the_spec_and_weights(capsys, tmp_path):
    out = tmp_path / "net.mix"
    weights = tmp_path / "net.safetensors"
    rc, _, err = run(
        capsys,
        "import",
        f"{MODELS}:make_cnn",
        "--args",
        '{"width": 8}',
        "--input",
        "1,8,8",
        "-o",
        str(out),
        "--weights",
        str(weights),
    )
    assert rc == 0, err
    n = sum(p.numel() for p in M.make_cnn(width=8).parameters())
    assert (
        f"parameters: module {n:,}, spec (one plain member) {n:,}; max |logit difference| 0" in err
    )
    assert "backbone small_cnn(classes = 10)" in out.read_text()
    from safetensors.numpy import load_file

    arrays = load_file(str(weights))
    assert arrays["member.conv1.weight"].shape == (1, 8, 1, 3, 3)
    rc, _, err = run(capsys, "check", str(out))
    assert rc == 0
    rc, _, err = run(capsys, "import", f"{MODELS}:make_cnn", "--input", "1,8,8", "-o", str(out))
    assert rc == 1 and "already exists" in err


def test_cli_refuses_a_mismatch_unless_forced(capsys, tmp_path, monkeypatch):
    import mixc.importing as importing

    def wrong(module, imported, plan, shape, backend="torch"):
        return {}, ImportCheck(10, 12, 0.5)

    monkeypatch.setattr(importing, "check", wrong)
    out = tmp_path / "net.mix"
    rc, _, err = run(capsys, "import", f"{MODELS}:make_cnn", "--input", "1,8,8", "-o", str(out))
    assert rc == 1 and not out.exists()
    assert "12 parameters against the module's 10" in err and "Traceback" not in err
    rc, _, err = run(
        capsys, "import", f"{MODELS}:make_cnn", "--input", "1,8,8", "-o", str(out), "--force"
    )
    assert rc == 0 and out.exists()


def test_unsupported_op_is_one_clear_error(capsys):
    rc, out, err = run(capsys, "import", f"{MODELS}:make_concat", "--input", "1,8,8")
    assert rc == 1 and not out
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "node 'cat'" in err and "torch.cat" in err
    assert "import_models.py:" in err and "torch.cat([self.a(x), self.b(x)], dim=1)" in err


def test_control_flow_and_bad_options():
    with pytest.raises(ModuleImportError, match="control flow.*import_models.py:\\d+"):
        mixc.import_module(M.Branchy(), (4,))
    with pytest.raises(ModuleImportError, match="fails on an input of shape"):
        mixc.import_module(M.SmallCNN(), (3, 8, 8))


def test_cli_bad_target(capsys, tmp_path):
    rc, _, err = run(capsys, "import", "nosuchfile.py:make", "--input", "1,8,8")
    assert rc == 1 and "no such Python file" in err
    rc, _, err = run(capsys, "import", f"{MODELS}:nothing", "--input", "1,8,8")
    assert rc == 1 and "no callable 'nothing'" in err
    rc, _, err = run(capsys, "import", f"{MODELS}:make_cnn", "--input", "1,x")
    assert rc == 1 and "--input" in err


def test_imported_cnn_trains_as_a_mixture_on_digits(tmp_path):
    """An imported CNN, as its spec's default ensemble (4 members, mixture, 1.0x), learns digits
    (about 15 s on one thread)."""
    from mixc.core.data import load_dataset
    from mixc.spec.recipe import Recipe
    from mixc.training import train

    text = mixc.import_module(M.DigitsCNN(), (1, 8, 8))
    assert "    budget 1.0x\n" in text and "    members 4\n" in text
    plan = mixc.compile_text(text, ["train.epochs=8"])
    assert plan.members == 4 and plan.method.name == "mixture" and plan.groups
    recipe = Recipe.model_validate(plan.train)
    m = train(
        "torch",
        plan,
        recipe,
        out_dir=tmp_path / "run",
        data=load_dataset("digits"),
        progress=False,
        threads=1,
    )
    assert m["accuracy"] >= 0.95


@pytest.mark.parametrize(
    "overrides",
    [["method=naive"], ["budget=3.0x", "templates_per_layer=2"]],
    ids=["naive", "mixture"],
)
def test_init_from_reproduces_the_pretrained_network(overrides):
    """--init-from: naive members are copies; a mixture whose bank can hold each banked layer
    (conv2 and conv3 share a shape) reproduces them by least squares, so every member's logits
    are the original's."""
    from mixc.backends import get_backend
    from mixc.backends.torch import build, named_plan_tensors
    from mixc.init_from import initialise

    module = M.randomised(M.SmallCNN()).eval()
    imported, plain = import_graph(module, [1, 8, 8], "cnn")
    names, _ = check(module, imported, plain, [1, 8, 8])
    pre = get_backend("torch").imported_arrays(module, names, plain)
    plan = mixc.compile_text(imported.text, overrides)
    model = build(plan).eval()
    tensors = named_plan_tensors(model)
    state = {k: v.detach().numpy().copy() for k, v in tensors.items()}
    new, lines = initialise(state, plan, pre, [])
    assert "copied exactly" in lines[0]
    assert any("least squares" in line for line in lines) == (plan.method.name == "mixture")
    with torch.no_grad():
        for k, v in new.items():
            tensors[k].copy_(torch.as_tensor(v))
        x = torch.randn(16, 1, 8, 8)
        want, got = module(x), model(x)
    assert got.shape[1] == 4
    assert (got - want[:, None]).abs().max() < 1e-4, lines


def test_stage_of_calls_where_no_repeat_expression_fits():
    """Widths 16, 32, 64 along one Sequential: no `if i == 0` expression gives them, so the stage
    lists its calls (named b0, b1, b2 as a repeat would)."""

    def block(cin, cout):
        down = torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 1, bias=False), torch.nn.BatchNorm2d(cout)
        )
        return M.BasicBlock(cin, cout, 1, down)

    class Pyramid(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.body = torch.nn.Sequential(block(8, 16), block(16, 32), block(32, 64))
            self.head = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean((2, 3)))

    module = M.randomised(Pyramid())
    imported, plan = import_graph(module, [1, 8, 8], "pyramid")
    _, result = check(module, imported, plan, [1, 8, 8])
    assert result.max_abs_diff <= 1e-5
    assert "    stage body {\n        basic_block b0(width = 16)\n" in imported.text
    assert "basic_block b2(width = 64)" in imported.text


def test_cli_module_path_and_help(capsys, tmp_path, monkeypatch):
    (tmp_path / "mixc_import_probe.py").write_text(
        "from torch import nn\n\ndef make(d=6):\n    return nn.Sequential(nn.Linear(d, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    rc, out, err = run(
        capsys, "import", "mixc_import_probe:make", "--args", '{"d": 5}', "--input", "5"
    )
    assert rc == 0, err
    assert "input vector(5)" in out and "linear linear_0(classes)" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "import" in capsys.readouterr().out


def test_init_from_a_foreign_or_damaged_file_is_one_clear_error(tmp_path):
    """A file of another model (a tensor of the wrong shape), a non-finite tensor or a bad noise
    factor: one TrainError naming the tensor or value, no traceback from numpy."""
    from safetensors.numpy import save_file

    from mixc.backends.torch import build, named_plan_tensors
    from mixc.core.errors import TrainError
    from mixc.init_from import initialise, read_pretrained

    module = M.randomised(M.SmallCNN()).eval()
    imported, plain = import_graph(module, [1, 8, 8], "cnn")
    plan = mixc.compile_text(imported.text, ["method=naive"])
    state = {k: v.detach().numpy().copy() for k, v in named_plan_tensors(build(plan)).items()}
    name = next(n for n in state if n.startswith("member.") and n.endswith(".weight"))
    wrong = {name: np.zeros((3, *state[name].shape[1:]), np.float32)}
    with pytest.raises(TrainError, match=f"tensor '{name}' has shape"):
        initialise(state, plan, wrong, [])
    with pytest.raises(TrainError, match="--init-noise"):
        initialise(state, plan, {name: state[name][:1]}, [], noise=-1.0)
    bad = np.full((1, *state[name].shape[1:]), np.nan, np.float32)
    save_file({name: bad}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(TrainError, match="not finite"):
        read_pretrained(tmp_path / "nan.safetensors")


def test_cli_refuses_weights_written_over_the_spec(capsys, tmp_path):
    out = tmp_path / "net.mix"
    argv = ["import", f"{MODELS}:make_cnn", "--input", "1,8,8", "-o", str(out)]
    rc, _, err = run(capsys, *argv, "--weights", str(tmp_path / "." / "net.mix"), "--force")
    assert rc == 1 and not out.exists()
    assert "is also -o" in err and "Traceback" not in err
