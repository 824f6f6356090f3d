"""Depth on Fashion-MNIST: how the conversion holds as networks get deeper (resnet20 first).

Three phases, each resumable (one run folder per trained network under benchmarks/runs/, one result
file per evaluated network under benchmarks/results/depth/; a rerun skips what is finished)::

    nice -n 19 python benchmarks/depth.py train             # the networks, in order of priority
    nice -n 19 python benchmarks/depth.py evaluate          # SNN accuracy of every finished network
    python benchmarks/depth.py render                       # results/depth.{md,json,png}

Every setting comes from a committed config (configs/fmnist-resnet20.toml); the runs differ from it only
in what :data:`RUNS` names (activation, L, seed, epochs). Training never looks at the test set; the
budget E is checked on the validation split (seed 0 at E and 2E epochs).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RUNS as RUNS_DIR  # noqa: E402
from eclsnn.recipes import runs  # noqa: E402

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT.parent / "configs"
RESULTS = ROOT / "results"


@dataclass(frozen=True)
class Spec:
    """One trained network: ``config`` plus these changes."""

    arch: str
    activation: str
    levels: int | None
    seed: int
    epochs: int
    config: str = "fmnist-resnet20.toml"
    overrides: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def tag(self) -> str:
        return self.arch

    @property
    def name(self) -> str:
        return runs.run_name(self.activation, self.levels, self.seed, self.epochs) + f"-{self.tag}"

    def ensure(self) -> Path:
        return runs.ensure_run(RUNS_DIR, self.activation, self.levels, self.seed, self.epochs,
                               overrides={"model.arch": self.arch, **self.overrides},
                               config_path=CONFIGS / self.config, tag=self.tag)


E = 10  # the budget of configs/fmnist-resnet20.toml

#: In order of priority (the issue's): resnet20 seed 0 at E and 2E (the convergence check), its ReLU
#: twin, L = 2, then seeds 1 and 2.
RUNS: list[Spec] = [
    Spec("resnet20", "clip", 4, 0, E),
    Spec("resnet20", "clip", 4, 0, 2 * E),
    Spec("resnet20", "relu", None, 0, E),
    Spec("resnet20", "clip", 2, 0, E),
    Spec("resnet20", "clip", 4, 1, E),
    Spec("resnet20", "relu", None, 1, E),
    Spec("resnet20", "clip", 4, 2, E),
    Spec("resnet20", "relu", None, 2, E),
]


def train(only: list[str] | None) -> None:
    for spec in RUNS:
        if only and spec.name not in only:
            continue
        print(f"[depth] {spec.name}: {'finished' if runs.is_finished(RUNS_DIR / spec.name) else 'training'}",
              flush=True)
        spec.ensure()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["train", "list"])
    p.add_argument("--only", nargs="*", help="run names (see `list`)")
    a = p.parse_args(argv)
    if a.phase == "list":
        for spec in RUNS:
            print(spec.name, "finished" if runs.is_finished(RUNS_DIR / spec.name) else "")
    else:
        train(a.only)


if __name__ == "__main__":
    main()
