"""CUDA checks of the generated models: numerics, bf16 autocast, channels_last, torch.compile,
timings.

Two steps, so the GPU machine needs nothing but torch:

    python bench/cuda_check.py emit DIR   # here: write generated model files (needs mixc)
    python3 bench/cuda_check.py run DIR [OUT.txt] [--no-compile]   # on the GPU machine: torch only

The generated files are the same self-contained sources ``mixc compile``
writes, which is also a check that they run outside the project.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path


def emit(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
    import handmade_plans as hp

    import mixc
    from mixc.backends.torch import emit_source

    plans = {
        "tiny": hp.tiny_convnet(),
        "rich": hp.rich_convnet(dropout=0.0),
        "signal": hp.signal_blob_net(),
        "mlp": hp.mlp_net(dropout=0.0),
        "digits": mixc.compile("zoo/digits.mix"),
        "wrn16_4": mixc.compile("wrn16_4", overrides=["members=4", "budget=1.0x"]),
        "wrn16_4_naive": mixc.compile("wrn16_4", overrides=["members=4", "groups=none"]),
        "wrn16_4_single": mixc.compile("wrn16_4", overrides=["members=1", "groups=none"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, plan in plans.items():
        (out / f"{name}.py").write_text(emit_source(plan))
    print(f"wrote {len(plans)} models to {out}")


# ---------------------------------------------------------------------------
# On the GPU machine: torch only


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # the model class: the generated subclass of the runtime's Ensemble (blocks and layers are not)
    cls = next(
        v
        for v in vars(mod).values()
        if isinstance(v, type) and issubclass(v, mod.Ensemble) and v is not mod.Ensemble
    )
    return mod, cls


def _probs(logits):
    import torch

    return torch.softmax(logits.float(), -1).mean(1)


def _loss_of(logits, y):
    import torch.nn.functional as F

    M = logits.shape[1]
    return F.cross_entropy(
        logits.float().flatten(0, 1), y.repeat_interleave(M), reduction="sum"
    ) / len(y)


def run(folder: Path, log, compile_models: bool = True) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")  # cpu: a smoke test of this script
    log(
        f"torch {torch.__version__},"
        f" {torch.cuda.get_device_name() if cuda else 'no CUDA: smoke test on CPU'}"
    )
    failures = []
    for name in ["tiny", "rich", "signal", "mlp", "digits"]:
        _check_numerics(folder, name, dev, log, failures)
    log(f"numerics: {'ALL OK' if not failures else 'FAILURES: ' + '; '.join(failures)}")

    if not cuda:
        return
    _time_wrn(folder, dev, log)
    for name in ("tiny", "wrn16_4") if compile_models else ():
        _check_compile(folder, name, dev, log)


# -- numerics -------------------------------------------------------------------------------------


def _check_numerics(folder: Path, name: str, dev, log, failures: list[str]) -> None:
    """One small model: every layout and memory format against fp64 on the CPU, grouped vs loop
    gradients, and bf16 autocast."""
    import torch

    mod, cls = _load(folder / f"{name}.py")
    torch.manual_seed(0)
    ref = cls(layout="loop").double()
    x64 = torch.randn(8, *cls.input_shape, dtype=torch.float64)
    y = torch.randint(0, cls.classes, (8,))
    _check_layouts(name, cls, ref, x64, dev, log, failures)
    _check_grads(name, cls, ref, x64, y, dev, log, failures)
    for layout in ("grouped", "loop"):
        _check_bf16(name, cls, ref, layout, x64, y, dev, log, failures)


def _check_layouts(name: str, cls, ref, x64, dev, log, failures: list[str]) -> None:
    before = len(failures)
    for training in (True, False):
        ref.train(training)
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        want = ref(x64)
        ref.load_state_dict(state)  # undo the running-stat update for the next comparison
        for layout in ("grouped", "loop", "auto"):
            for cl in (False, True):
                m = cls(layout=layout, channels_last=cl).to(dev)
                m.load_state_dict(state)
                m.train(training)
                got = m(x64.float().to(dev)).double().cpu()
                err = (got - want).abs().max().item()
                ok = err < 1e-3
                if not ok:
                    failures.append(f"{name} {layout} cl={cl} train={training}: {err:.2e}")
        log(
            f"{name:8} train={training!s:5} fp32 CUDA vs fp64 CPU, every layout/format: "
            f"{'ok' if len(failures) == before else failures[-1]}"
        )


def _check_grads(name: str, cls, ref, x64, y, dev, log, failures: list[str]) -> None:
    """Gradients: grouped == loop on CUDA."""
    grads = {}
    for layout in ("grouped", "loop"):
        m = cls(layout=layout).to(dev).train()
        m.load_state_dict(ref.state_dict())
        _loss_of(m(x64.float().to(dev)), y.to(dev)).backward()
        grads[layout] = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    # relative to the largest gradient: a conv bias before BN has a (near-)zero gradient
    scale = max(g.abs().max().item() for g in grads["loop"].values())
    gerr = (
        max((grads["grouped"][n] - grads["loop"][n]).abs().max().item() for n in grads["loop"])
        / scale
    )
    log(f"{name:8} grouped vs loop gradients, max diff / max gradient {gerr:.1e}")
    if gerr > 1e-3:
        failures.append(f"{name} grads {gerr}")


def _check_bf16(name: str, cls, ref, layout: str, x64, y, dev, log, failures: list[str]) -> None:
    """bf16 autocast forward + backward."""
    import torch

    kind = dev.type
    m = cls(layout=layout, channels_last=True).to(dev).train()
    m.load_state_dict(ref.state_dict())
    x = x64.float().to(dev)
    with torch.autocast(kind, dtype=torch.bfloat16):
        logits = m(x)
    _loss_of(logits, y.to(dev)).backward()
    finite = all(torch.isfinite(p.grad).all().item() for p in m.parameters() if p.grad is not None)
    m.load_state_dict(ref.state_dict())
    with torch.no_grad():
        m.eval()
        with torch.autocast(kind, dtype=torch.bfloat16):
            pb = _probs(m(x))
        pf = _probs(m(x))
    perr = (pb - pf).abs().max().item()
    log(
        f"{name:8} bf16 autocast {layout}: grads finite={finite}, eval prob diff vs fp32 {perr:.3f}"
    )
    if not finite or perr > 0.05:
        failures.append(f"{name} bf16 {layout}")


# -- timings: WRN-16-4, fwd+bwd -------------------------------------------------------------------


def _bench(step, warmup=10, reps=30):
    import torch

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def _ens_step(m, x, y, bf16):
    import torch

    def step():
        m.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = m(x)
        _loss_of(logits, y).backward()

    return step


def _loop_of(models, x, y, bf16):
    steps = [_ens_step(m, x, y, bf16) for m in models]

    def step():
        for s in steps:
            s()

    return step


def _time_wrn(folder: Path, dev, log) -> None:
    import torch

    _, ME = _load(folder / "wrn16_4.py")
    _, NAIVE = _load(folder / "wrn16_4_naive.py")
    _, ONE = _load(folder / "wrn16_4_single.py")
    for batch in (64, 128):
        x = torch.randn(batch, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)
        for bf16, cl in ((False, False), (True, True)):
            tag = "bf16+channels_last" if bf16 else "fp32"
            row = []
            for label, cls in (("ME", ME), ("naive", NAIVE)):
                for layout in ("grouped", "loop"):
                    m = cls(layout=layout, channels_last=cl).to(dev).train()
                    row.append(f"{label} {layout} {_bench(_ens_step(m, x, y, bf16)):.1f}")
            singles = [ONE(layout="loop", channels_last=cl).to(dev).train() for _ in range(4)]
            row.append(f"4x single {_bench(_loop_of(singles, x, y, bf16)):.1f}")
            log(f"WRN-16-4 M=4 batch {batch} {tag} (ms/step): " + ", ".join(row))


# -- torch.compile --------------------------------------------------------------------------------


def _check_compile(folder: Path, name: str, dev, log) -> None:
    import torch

    _, cls = _load(folder / f"{name}.py")
    batch = 8 if name == "tiny" else 128
    torch.manual_seed(0)
    base = cls(layout="loop")
    x = torch.randn(batch, *cls.input_shape, device=dev)
    y = torch.randint(0, cls.classes, (batch,), device=dev)
    for layout in ("grouped", "loop"):
        eager = cls(layout=layout, channels_last=True).to(dev).train()
        eager.load_state_dict(base.state_dict())
        comp = cls(layout=layout, channels_last=True).to(dev).train()
        comp.load_state_dict(base.state_dict())
        log(_compare_compiled(name, layout, comp, eager, x, y))


def _compare_compiled(name: str, layout: str, comp, eager, x, y) -> str:
    """One bf16 training step of a torch.compile'd copy against the eager model."""
    import torch

    kind = x.device.type
    cm = torch.compile(comp)
    t = time.perf_counter()
    with torch.autocast(kind, dtype=torch.bfloat16):
        lc = cm(x)
    _loss_of(lc, y).backward()
    torch.cuda.synchronize()
    ctime = time.perf_counter() - t
    with torch.autocast(kind, dtype=torch.bfloat16):
        le = eager(x)
    _loss_of(le, y).backward()
    diff = (_probs(lc) - _probs(le)).abs().max().item()
    gscale = max(b.grad.abs().max().item() for b in eager.parameters())
    gd = (
        max(
            (a.grad - b.grad).abs().max().item()
            for a, b in zip(comp.parameters(), eager.parameters())
        )
        / gscale
    )
    bn = max((a - b).abs().max().item() for a, b in zip(comp.buffers(), eager.buffers()))
    msg = (
        f"compile {name} {layout} bf16+cl: first step {ctime:.0f} s, prob diff {diff:.3f},"
        f" grad rel diff {gd:.2e}, running-stat diff {bn:.1e}"
    )
    if name == "wrn16_4":
        msg += (
            f"; step {_bench(_ens_step(cm, x, y, True), 5, 20):.1f} ms vs eager"
            f" {_bench(_ens_step(eager, x, y, True), 5, 20):.1f} ms"
        )
    return msg


def main() -> int:
    flags = {a for a in sys.argv[1:] if a.startswith("--")}
    argv = [a for a in sys.argv[1:] if not a.startswith("--")]
    cmd, folder = argv[0], Path(argv[1])
    if cmd == "emit":
        emit(folder)
        return 0
    out = Path(argv[2]) if len(argv) > 2 else None
    lines = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)
        if out:
            out.write_text("\n".join(lines) + "\n")

    run(folder, log, compile_models="--no-compile" not in flags)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
