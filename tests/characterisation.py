"""Characterisation of eclsnn's observable behaviour, for refactorings that must not change it.

``compute_*`` functions run eclsnn through its public API and command line and return what a user
can observe — per-layer spike counts and logits of every simulation path, a seeded training run's
weights and metrics, the ``analyze`` / ``ablate`` / ``evaluate`` JSON, the export bytes — as flat
``{key: numpy array}`` dictionaries. ``tests/test_characterisation.py`` compares them with the
``.npz`` files in ``tests/golden/``, written by ``python tests/characterisation.py --write`` from the
code before a refactoring.

Floating-point results of convolutions depend on the CPU's instruction set (oneDNN picks kernels by
it) and on the torch build, so every golden file records the machine it was written on
(:func:`machine_signature`); on that machine the comparison is bit for bit, on another one it is
within float32 rounding (see the test).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).with_name("golden")
ARCHS = ("cnn-fmnist", "resnet20")
NEURONS = ("if", "dual")
V_INITS = (0.0, 0.5)
MODES = ("fused", "reference", "single", "subbatch", "carried")
T = 8
BATCH = 8
#: JSON keys whose values are wall-clock times, paths or versions: not behaviour
VOLATILE = {"seconds", "epoch_seconds", "checkpoint", "elapsed", "time", "path", "run", "output", "version",
            "eclsnn_version", "torch_version", "created", "data_dir", "runs_dir", "wall_seconds",
            "images_per_second", "throughput", "hostname"}


def machine_signature() -> str:
    """What float results depend on besides the code: torch build, CPU capability and model."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                cpu += line
    cap = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__} | {platform.machine()} | {cap} | " + hashlib.sha256(cpu.encode()).hexdigest()[:16]


def _digest(t: torch.Tensor) -> str:
    a = t.detach().contiguous().cpu().numpy()
    return hashlib.sha256(a.tobytes() + str(a.dtype).encode() + str(a.shape).encode()).hexdigest()


@contextlib.contextmanager
def reference_path():
    """The PyTorch reference path instead of the fused CPU kernels."""
    from eclsnn.core.backends import cpu as kernels

    with kernels.reference_only():
        yield


def _inputs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 28, 28, generator=g) - 0.286) / 0.353


def build_ann(arch: str) -> torch.nn.Module:
    """A seeded ReLU network of the zoo, BN statistics perturbed, prepared to ThresholdClip (L = 4) with
    λ from calibration data: realistic activity in every layer without training."""
    from eclsnn import prepare
    from eclsnn.models import create

    torch.manual_seed(1234)
    model = create(arch, num_classes=10, activation="relu", in_channels=1)
    g = torch.Generator().manual_seed(99)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.8 + 0.4 * torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    model.eval()
    prepared = prepare(model, levels=4, calibration=_inputs(32, 7))
    return prepared.eval()


def _per_layer(snn, run) -> dict[str, np.ndarray]:
    """Per-step spike counts (Σ s over the layer) and a digest of each layer's spike maps, from ``run()``
    under the neuron observer (multi-step) or forward hooks (single-step)."""
    from eclsnn.simulation import observe_neurons

    seen: dict[str, list[torch.Tensor]] = {}

    def record(name, _current, out):
        seen.setdefault(name, []).append(out.detach().clone())

    handles = []
    if snn.step_mode == "single":
        for name, neuron in snn.neurons():
            handles.append(neuron.register_forward_hook(lambda m, i, o, _n=name: record(_n, None, o.unsqueeze(0))))
        ctx = contextlib.nullcontext()
    else:
        ctx = observe_neurons(snn, record)
    try:
        with ctx:
            run()
    finally:
        for h in handles:
            h.remove()
    out = {}
    thetas = dict(snn.thresholds())
    for name, chunks in seen.items():
        spikes = torch.cat(chunks, 0) if snn.step_mode == "single" else _join(chunks)
        theta = thetas[name]
        theta = theta.view(1, 1, -1, *([1] * (spikes.dim() - 3))) if theta.dim() == 1 else theta
        s = torch.round(spikes / theta).to(torch.int8)
        out[f"count/{name}"] = s.flatten(2).sum(-1).sum(-1).numpy().astype(np.int64)  # [T]
        out[f"digest/{name}"] = np.array(_digest(s))
    return out


def _join(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Observer calls per sub-batch or per block → one ``[T, B, ...]`` tensor."""
    if len(chunks) == 1:
        return chunks[0]
    if all(c.shape[0] == chunks[0].shape[0] for c in chunks) and chunks[0].shape[0] == T:
        return torch.cat(chunks, 1)  # sub-batches
    return torch.cat(chunks, 0)  # blocks of steps (carried state)


def compute_simulation(arch: str, neuron: str, v_init: float, mode: str) -> dict[str, np.ndarray]:
    """Logits and per-layer spikes of one simulation path at T = 1..8 on a seeded batch."""
    from eclsnn import convert, simulate

    ann = build_ann(arch)
    snn = convert(ann, neuron=neuron, v_init=v_init)
    x = _inputs(BATCH, 3)
    ctx = reference_path() if mode == "reference" else contextlib.nullcontext()
    result: dict[str, np.ndarray] = {}
    with ctx, torch.no_grad():
        if mode in ("fused", "reference"):
            result["logits"] = simulate(snn, x, T).numpy()
            result.update(_per_layer(snn, lambda: snn.run(x, T)))
        elif mode == "subbatch":
            snn.max_rows = 3 * T  # sub-batches of 3 samples (3, 3, 2)
            result["logits"] = simulate(snn, x, T).numpy()
            result.update(_per_layer(snn, lambda: snn.run(x, T)))
        elif mode == "single":
            snn.set_step_mode("single")
            steps = []

            def run_single():
                steps.clear()
                snn.reset()
                for _ in range(T):
                    steps.append(snn(x))

            result.update(_per_layer(snn, run_single))
            out = torch.stack(steps)
            result["logits"] = (out.cumsum(0) / torch.arange(1, T + 1).view(T, 1, 1)).numpy()
        elif mode == "carried":
            from eclsnn.simulation.adaptive import simulate_adaptive

            snn.max_rows = None
            parts = []

            def run_blocks():
                parts.clear()
                snn.reset()
                parts.append(snn.run(x, 3))
                parts.append(snn.run(x, 5, carry_state=True))

            result.update(_per_layer(snn, run_blocks))
            out = torch.cat(parts, 0)
            result["logits"] = (out.cumsum(0) / torch.arange(1, T + 1).view(T, 1, 1)).numpy()
            mean = torch.from_numpy(result["logits"])
            top2 = mean.topk(2, -1).values
            margin = float((top2[..., 0] - top2[..., 1]).quantile(0.75))
            logits, used = simulate_adaptive(snn, x, T, margin, block=3)
            result["adaptive_logits"] = logits.numpy()
            result["adaptive_steps"] = used.numpy().astype(np.int64)
        else:
            raise ValueError(mode)
    result["thetas"] = np.concatenate([t.flatten().numpy() for t in snn.thresholds().values()])
    return result


# ---- command-line runs on real data ----------------------------------------------------------------

def _cli(*argv: str) -> str:
    from eclsnn.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(list(argv))
    if code:
        raise RuntimeError(f"eclsnn {' '.join(argv)} exited with {code}: {buf.getvalue()}")
    return buf.getvalue()


def _flatten_json(obj, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if str(k) not in VOLATILE:
                _flatten_json(v, f"{prefix}/{k}", out)
    elif isinstance(obj, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj) and obj:
        out[prefix] = np.asarray(obj, dtype=np.float64)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _flatten_json(v, f"{prefix}/{i}", out)
    elif isinstance(obj, bool) or obj is None or isinstance(obj, str):
        if isinstance(obj, str) and ("/" in obj or "\\" in obj):
            return  # a path
        out[prefix] = np.array(str(obj))
    else:
        out[prefix] = np.asarray(obj, dtype=np.float64)


def _json_file(path: Path, prefix: str, out: dict[str, np.ndarray]) -> None:
    _flatten_json(json.loads(path.read_text()), prefix, out)


def compute_cli(workdir: Path) -> dict[str, np.ndarray]:
    """A seeded one-epoch training run on 1k Fashion-MNIST images, then evaluate, convert, export
    (npz/json/NIR), analyze and ablate on it, through the command line."""
    from safetensors.torch import load_file

    out: dict[str, np.ndarray] = {}
    runs = workdir / "runs"
    _cli("train", "--arch", "cnn-fmnist", "--epochs", "1", "--max-train-samples", "1000", "--seed", "0",
         "--output", str(runs), "--run-name", "golden", "--batch-size", "128")
    run = runs / "golden"
    weights = sorted(run.rglob("model.safetensors"))
    state = load_file(str(weights[-1]))
    for k in sorted(state):
        out[f"train/state/{k}"] = np.array(_digest(state[k]))
    for f in sorted(run.glob("*.json")):
        _json_file(f, f"train/{f.stem}", out)
    for f in sorted(run.glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines()):
            _flatten_json(json.loads(line), f"train/{f.stem}/{i}", out)

    common = ("--max-samples", "200", "--no-progress")
    _cli("evaluate", str(run), "-T", "4", "--json", str(workdir / "eval.json"), "--adaptive", *common)
    _json_file(workdir / "eval.json", "evaluate", out)
    _cli("convert", str(run), "-o", str(workdir / "snn"), "--neuron", "dual")
    for f in sorted((workdir / "snn").iterdir()):
        if f.suffix == ".safetensors":
            st = load_file(str(f))
            for k in sorted(st):
                out[f"convert/{f.name}/{k}"] = np.array(_digest(st[k]))
        elif f.suffix == ".json":
            _json_file(f, f"convert/{f.stem}", out)
    for fmt in ("npz", "json", "nir"):
        path = workdir / f"snn.{fmt}"
        _cli("export", str(workdir / "snn"), "--format", fmt, "-o", str(path))
        out[f"export/{fmt}"] = np.array(hashlib.sha256(path.read_bytes()).hexdigest())
    _cli("analyze", str(run), "-T", "4", "-o", str(workdir / "analysis"), "--max-samples", "100", "--no-progress")
    for f in sorted((workdir / "analysis").glob("*.json")):
        _json_file(f, f"analyze/{f.stem}", out)
    _cli("ablate", "--seeds", "0", "--epochs", "1", "--max-train-samples", "500", "--max-samples", "100",
         "-T", "1", "2", "--runs-dir", str(runs), "-o", str(workdir / "ablation"), "--no-progress",
         "--set", "train.batch_size=128")
    for f in sorted((workdir / "ablation").glob("*.json")):
        _json_file(f, f"ablate/{f.stem}", out)
    return out


# ---- files written by the code before a refactoring -------------------------------------------------

FIXTURES = Path(__file__).with_name("fixtures") / "main-0.1.0"
_FIXTURE_TRAIN = ("--arch", "cnn-fmnist", "--epochs", "2", "--max-train-samples", "600", "--seed", "5",
                  "--batch-size", "100", "--set", "train.eval_test=false", "--set", "train.progress=false")


def make_fixtures(dest: Path = FIXTURES) -> None:
    """Write, with the current code, a run folder stopped after epoch 1 of 2, an SNN folder converted from
    its checkpoint, and the SNN's npz and NIR exports."""
    import shutil

    from eclsnn.training import trainer as train_module

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    original = train_module._Trainer._save

    class Stop(Exception):
        pass

    def save_then_stop(self, epoch, *args, **kwargs):
        original(self, epoch, *args, **kwargs)
        if epoch == 1:
            raise Stop

    train_module._Trainer._save = save_then_stop
    try:
        _cli("train", *_FIXTURE_TRAIN, "--output", str(dest), "--run-name", "run")
    except Stop:
        pass
    finally:
        train_module._Trainer._save = original
    _cli("convert", str(dest / "run"), "-o", str(dest / "snn"), "--neuron", "dual")
    for fmt in ("npz", "nir"):
        _cli("export", str(dest / "snn"), "--format", fmt, "-o", str(dest / f"snn.{fmt}"))


def compute_fixtures(workdir: Path) -> dict[str, np.ndarray]:
    """What the committed fixtures give today: the checkpoint's ANN logits, the SNN folder's logits, the
    npz arrays, the NIR graph's logits, bytes of a fresh export, and the run resumed to its end."""
    import shutil

    from eclsnn import simulate
    from eclsnn.io.nir import read_nir
    from eclsnn.recipes.common import load_ann, load_snn
    from safetensors.torch import load_file

    src = workdir / "fixtures"
    shutil.copytree(FIXTURES, src)
    spec_path = src / "snn" / "snn.json"  # the SNN folder names its checkpoint by absolute path
    spec = json.loads(spec_path.read_text())
    spec["checkpoint"] = str(src / "run" / "checkpoints" / "last")
    spec_path.write_text(json.dumps(spec))
    out: dict[str, np.ndarray] = {}
    x = _inputs(8, 11)
    with torch.no_grad():
        model, _ = load_ann(src / "run")
        out["checkpoint/logits"] = model(x).numpy()
        snn, *_ = load_snn(src / "snn")
        out["snn/logits"] = simulate(snn, x, 6).numpy()
        with np.load(src / "snn.npz", allow_pickle=False) as z:
            for k in sorted(z.files):
                a = np.ascontiguousarray(z[k])
                out[f"npz/{k}"] = np.array(hashlib.sha256(a.tobytes() + str(a.dtype).encode() + str(a.shape).encode()).hexdigest())
        imported = read_nir(src / "snn.nir")
        out["nir/logits"] = simulate(imported, x, 6).numpy()
    for fmt in ("npz", "nir"):
        fresh = workdir / f"fresh.{fmt}"
        _cli("export", str(src / "snn"), "--format", fmt, "-o", str(fresh))
        out[f"fresh_export_equals_fixture/{fmt}"] = np.array(fresh.read_bytes() == (FIXTURES / f"snn.{fmt}").read_bytes())
    _cli("train", *_FIXTURE_TRAIN, "--output", str(src), "--run-name", "run", "--resume")
    state = load_file(str(src / "run" / "checkpoints" / "last" / "model.safetensors"))
    for k in sorted(state):
        out[f"resumed/state/{k}"] = np.array(_digest(state[k]))
    for i, line in enumerate((src / "run" / "metrics.jsonl").read_text().splitlines()):
        _flatten_json(json.loads(line), f"resumed/metrics/{i}", out)
    return out


def compute_help() -> dict[str, np.ndarray]:
    """``--help`` text of the program and every subcommand, and the exit status and first error line of
    mistakes a user makes."""
    from eclsnn.cli import build_parser, main

    import os

    os.environ["COLUMNS"] = "100"  # argparse wraps help text to the terminal's width
    out: dict[str, np.ndarray] = {}
    commands = ["", "train", "convert", "evaluate", "export", "demo", "analyze", "ablate"]
    for cmd in commands:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            build_parser().parse_args([cmd, "--help"] if cmd else ["--help"])
        out[f"help/{cmd or 'eclsnn'}"] = np.array(buf.getvalue())
    mistakes = {
        "no-command": [], "unknown-command": ["fly"], "missing-checkpoint": ["convert", "/nonexistent/run"],
        "bad-T": ["evaluate", "/nonexistent", "-T", "0"], "bad-neuron": ["convert", "x", "--neuron", "lif"],
        "bad-set": ["train", "--set", "nosuchsection.key=1"], "bad-arch": ["train", "--arch", "nonet", "--epochs", "1"],
    }
    for name, argv in mistakes.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
        out[f"exit/{name}"] = np.array(code if isinstance(code, int) else -1)
        lines = [ln for ln in err.getvalue().splitlines() if "error" in ln]
        out[f"stderr/{name}"] = np.array(lines[-1] if lines else "")
    return out


def cases() -> list[str]:
    return [f"sim-{a}-{n}-v{v}-{m}" for a in ARCHS for n in NEURONS for v in V_INITS for m in MODES]


def compute(case: str, workdir: Path | None = None) -> dict[str, np.ndarray]:
    if case == "help":
        return compute_help()
    if case in ("cli", "fixtures"):
        assert workdir is not None
        return compute_cli(workdir) if case == "cli" else compute_fixtures(workdir)
    _, rest = case.split("-", 1)
    for arch in ARCHS:
        if rest.startswith(arch + "-"):
            neuron, v, mode = rest[len(arch) + 1:].split("-")
            return compute_simulation(arch, neuron, float(v[1:]), mode)
    raise ValueError(case)


def write(case: str, result: dict[str, np.ndarray]) -> Path:
    GOLDEN.mkdir(exist_ok=True)
    path = GOLDEN / f"{case}.npz"
    np.savez_compressed(path, __machine__=np.array(machine_signature()), **result)
    return path


if __name__ == "__main__":
    import tempfile

    if "--write" not in sys.argv:
        sys.exit("usage: python tests/characterisation.py --write [--fixtures] [CASE ...]\n"
                 "  writes tests/golden/*.npz (and, with --fixtures, first tests/fixtures/main-0.1.0/)")
    if "--fixtures" in sys.argv:
        make_fixtures()
    wanted = [a for a in sys.argv[1:] if not a.startswith("--")] or [*cases(), "help", "cli", "fixtures"]
    for case in wanted:
        with tempfile.TemporaryDirectory() as tmp:
            print(write(case, compute(case, Path(tmp))))
