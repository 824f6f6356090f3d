"""Speed of this source tree against another (e.g. the code before a redesign), measured side by side.

    git worktree add /tmp/eclsnn-old <rev>
    nice -n 19 python benchmarks/compare_versions.py --old /tmp/eclsnn-old/src [--reps 5] [--threads 2]

Each repetition runs one fresh process per tree (alternating which goes first), each timing the same
calls on the same network and images: the cnn-fmnist checkpoint written by eclsnn 0.1.0
(``tests/fixtures/main-0.1.0/run``), converted to dual-threshold neurons (v(0) = θ/2), a batch of 256
Fashion-MNIST test images:

- ``snn.run(x, T)`` for T = 1, 2, 4, 8, 16 (the default path: C kernels, neuron+pool fusion, sub-batches);
- the same at T = 4 on the PyTorch reference path;
- T = 4 in single-step mode (``snn(x)`` four times);
- the ANN forward pass, and a training step (forward + backward) of the ThresholdClip ANN.

Each process warms up once, then times every call in loops of at least 0.3 s and keeps the fastest of
five loops. The report gives, per call,
the median over the repetitions for each tree and the ratio new/old; the claim is that each ratio lies
within ±5 %. Writes ``benchmarks/results/compare_versions.{json,md}``. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "main-0.1.0" / "run"
FMNIST = Path(os.environ.get("ECLSNN_DATA", "/usr/share/datasets/fashion-mnist"))
RESULTS = ROOT / "benchmarks" / "results"
STEPS = (1, 2, 4, 8, 16)
CONTROL = "ANN forward"  # the same code in both trees


def _images(n: int):
    import numpy as np
    import torch

    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    return (torch.from_numpy(data.astype(np.float32) / 255.0) - 0.2860) / 0.3530


def child(threads: int) -> None:
    """Time the calls with whatever ``eclsnn`` is on the path; print one JSON line."""
    import torch

    torch.set_num_threads(threads)
    import eclsnn

    try:  # the layout since the redesign
        from eclsnn.core.backends import reference_only
        from eclsnn.recipes.common import load_ann
    except ImportError:  # 0.1.0's flat layout
        from eclsnn.experiment import load_ann
        from eclsnn.kernels import reference_only

    model, _ = load_ann(FIXTURE)
    x = _images(256)
    snn = eclsnn.convert(model, neuron="dual", v_init=0.5)
    calls = {f"run T={T}": (lambda T=T: snn.run(x, T)) for T in STEPS}

    def reference():
        with reference_only():
            return snn.run(x, 4)

    def single():
        snn.set_step_mode("single")
        try:
            return [snn(x) for _ in range(4)]
        finally:
            snn.set_step_mode("multi")

    import eclsnn.models

    torch.manual_seed(0)
    train_model = eclsnn.models.create("cnn-fmnist", num_classes=10, in_channels=1, init_threshold=2.0)
    xb, yb = x[:128], torch.arange(128) % 10

    def train_step():
        train_model.zero_grad()
        torch.nn.functional.cross_entropy(train_model(xb), yb).backward()

    calls.update({"reference T=4": reference, "single-step T=4": single, "ANN forward": lambda: model(x),
                  "ANN train step (128)": train_step})
    times = {}
    for name, fn in calls.items():
        with torch.enable_grad() if name == "ANN train step (128)" else torch.no_grad():
            times[name] = _best_time(fn)
    print(json.dumps({"eclsnn": eclsnn.__file__, "times": times}))


def _best_time(fn, min_seconds: float = 0.3, timings: int = 5) -> float:
    """Seconds per call: calls are batched into loops of at least ``min_seconds``; the fastest of
    ``timings`` loops (the least disturbed by the rest of the machine) divided by its length."""
    fn()
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_seconds:
            break
        n *= 2
    best = t / n
    for _ in range(timings - 1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def run_child(src: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run([sys.executable, __file__, "--child", "--threads", str(threads)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, help="the src/ folder of the tree to compare against")
    ap.add_argument("--new", type=Path, default=ROOT / "src")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default="", help="a sentence about the machine, printed in the report")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.threads)
        return
    if args.old is None:
        ap.error("--old SRC is required")
    runs = {"old": [], "new": []}
    for rep in range(args.reps):
        order = ("old", "new") if rep % 2 == 0 else ("new", "old")
        for which in order:
            res = run_child(getattr(args, which), args.threads)
            runs[which].append(res["times"])
            print(f"rep {rep + 1}/{args.reps} {which}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in res["times"].items()),
                  flush=True)
    names = list(runs["new"][0])
    rows = []
    for name in names:
        old = statistics.median(r[name] for r in runs["old"])
        new = statistics.median(r[name] for r in runs["new"])
        # the same ratio with each process's time divided by its own ANN forward pass (code that did not
        # change): what remains when a process as a whole ran fast or slow
        rel_old = statistics.median(r[name] / r[CONTROL] for r in runs["old"])
        rel_new = statistics.median(r[name] / r[CONTROL] for r in runs["new"])
        rows.append({"call": name, "old_ms": 1e3 * old, "new_ms": 1e3 * new, "ratio": new / old,
                     "ratio_vs_control": rel_new / rel_old})
    result = {"old": str(args.old), "new": str(args.new), "reps": args.reps, "threads": args.threads,
              "note": args.note, "rows": rows, "runs": runs,
              "within_5_percent": all(abs(r["ratio"] - 1) <= 0.05 for r in rows),
              "within_5_percent_vs_control": all(abs(r["ratio_vs_control"] - 1) <= 0.05 for r in rows if r["call"] != CONTROL)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compare_versions.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Speed of `{args.new}` against `{args.old}`", "",
             f"`python benchmarks/compare_versions.py --old {args.old} --reps {args.reps} --threads {args.threads}`: "
             f"{args.reps} interleaved repetitions, one fresh process per tree each, fastest of five "
             "loops of >= 0.3 s per call in a process, medians over the repetitions. " + args.note, "",
             "| call | old (ms) | new (ms) | new / old | new / old, each process relative to its ANN forward |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['call']} | {r['old_ms']:.1f} | {r['new_ms']:.1f} | {r['ratio']:.3f} | {r['ratio_vs_control']:.3f} |"
              for r in rows]
    lines += ["", f"Every ratio within ±5 %: {'yes' if result['within_5_percent'] else 'no'}; relative to the control: "
              f"{'yes' if result['within_5_percent_vs_control'] else 'no'}. The control ({CONTROL}) runs the same code "
              "in both trees, so its own ratio shows how much the machine moved between processes."]
    (RESULTS / "compare_versions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
