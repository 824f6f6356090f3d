"""Depth on Fashion-MNIST: how the conversion holds as networks get deeper (resnet20 first).

Three phases, each resumable (one run folder per trained network under benchmarks/runs/, one result
file per evaluated network under benchmarks/results/depth/; a rerun skips what is finished)::

    nice -n 19 python benchmarks/depth.py train             # the networks, in order of priority
    nice -n 19 python benchmarks/depth.py validate          # the remedies of the gap, on the validation split
    nice -n 19 python benchmarks/depth.py evaluate          # SNN accuracy of every finished network (test set)
    nice -n 19 python benchmarks/depth.py all               # the three above, run by run
    python benchmarks/depth.py render                       # results/depth.{md,json,png}

Every setting comes from a committed config (configs/fmnist-resnet20.toml); the runs differ from it only
in what :data:`RUNS` names (activation, L, seed, epochs). Training never looks at the test set; the
budget E is checked on the validation split (seed 0 at E and 2E epochs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RUNS as RUNS_DIR  # noqa: E402
from eclsnn import convert  # noqa: E402
from eclsnn.config import config_from_dict  # noqa: E402
from eclsnn.io.snn_folder import load_ann  # noqa: E402
from eclsnn.models.external import is_external  # noqa: E402
from eclsnn.recipes import runs  # noqa: E402
from eclsnn.recipes.analysis import analyze_checkpoint  # noqa: E402
from eclsnn.recipes.common import calibration_batches, eval_loader, evaluate_variants, load_split, write_json  # noqa: E402

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
    variant: str = ""  # names a recipe change (overrides) in the run's folder name
    #: False: a candidate remedy, measured on the validation split only (the test set sees what it chose)
    test: bool = True

    @property
    def tag(self) -> str:
        return self.arch.replace(":", "-") + (f"-{self.variant}" if self.variant else "")

    @property
    def name(self) -> str:
        return runs.run_name(self.activation, self.levels, self.seed, self.epochs) + f"-{self.tag}"

    def ensure(self) -> Path:
        if is_external(self.arch):
            _vision_libs()
        return runs.ensure_run(RUNS_DIR, self.activation, self.levels, self.seed, self.epochs,
                               overrides={"model.arch": self.arch, **self.overrides},
                               config_path=CONFIGS / self.config, tag=self.tag)


E = 10  # the budget of configs/fmnist-resnet20.toml


def _vision_libs() -> None:
    """torchvision's model code, also where its wheel was built for another torch (tests/vision_libs.py)."""
    sys.path.insert(0, str(ROOT.parent / "tests"))
    import vision_libs

    vision_libs.import_vision_libs()

BASE = "fmnist-clip-L4-e10-s0-resnet20"  # the network the fine-tuning variants start from
BASE_L2 = "fmnist-clip-L2-e10-s0-resnet20"


def _snn_finetune(init: str, levels: int, epochs: int, lr: float) -> Spec:
    """``epochs`` more epochs of ``init`` with the converted SNN in the loop at T = 2 (every epoch, one
    cosine schedule from ``lr``): docs/METHOD.md, training with the SNN in the loop."""
    return Spec("resnet20", "clip", levels, 0, epochs, variant=f"snn2-ft-lr{lr:g}", test=False,
                overrides={"train.init_from": str(RUNS_DIR / init), "train.snn_epochs": epochs,
                           "train.snn_time_steps": 2, "train.lr": lr})


R18 = "torchvision:resnet18"
R18_CONFIG = "fmnist-resnet18.toml"
R18_EPOCHS = 8  # the ReLU network's budget; the fine-tune gets a quarter of it
R18_RELU = runs.run_name("relu", None, 0, R18_EPOCHS) + "-torchvision-resnet18"


def _r18_finetune(lr: float, percentile: float = 99.9, per_channel: bool = False) -> Spec:
    """The pretrained path: the ReLU resnet18 fine-tuned with the threshold clip for a quarter of its epochs,
    λ starting at the ``percentile`` of each ReLU's (or channel's) output."""
    variant = "ft" + ("-pc" if per_channel else "") + (f"-p{percentile:g}" if percentile != 99.9 else "") + f"-lr{lr:g}"
    return Spec(R18, "clip", 4, 0, R18_EPOCHS // 4, config=R18_CONFIG, variant=variant,
                overrides={"train.init_from": str(RUNS_DIR / R18_RELU), "train.lr": lr,
                           "train.init_percentile": percentile, "model.per_channel": per_channel})


#: The pretrained path (configs/fmnist-resnet18.toml): the ReLU network (standing in for a downloaded one),
#: its clip fine-tunes (the learning rate chosen on the validation split) and the clip network trained from
#: scratch with the same total budget.
#: Right after the prepare, before any fine-tuning, L = 4 costs this ReLU network 12 points on 2,000
#: validation images (89.70 → 77.25 %, λ at the 99.9th percentile per layer; 83.90 % per channel at the 99th):
#: the first two fine-tunes (lr 0.01, 0.001) did not recover it in 2 epochs, so two more were tried, a larger
#: learning rate and per-channel λ from the 99th percentile; both helped (validation), so the fifth has both.
FINETUNES: list[Spec] = [_r18_finetune(0.01), _r18_finetune(0.001), _r18_finetune(0.05),
                         _r18_finetune(0.01, percentile=99.0, per_channel=True),
                         _r18_finetune(0.05, percentile=99.0, per_channel=True)]
PRETRAINED: list[Spec] = [
    Spec(R18, "relu", None, 0, R18_EPOCHS, config=R18_CONFIG),
    *FINETUNES,
    Spec(R18, "clip", 4, 0, R18_EPOCHS + R18_EPOCHS // 4, config=R18_CONFIG),
]

#: In order of priority: resnet20 seed 0, its ReLU twin (for SpikingJelly and the gap to the ReLU
#: ANN), L = 2, seeds 1 and 2, fine-tuning with the SNN in the loop (measured on the validation split),
#: the budget check at 2E, the 4-layer CNN and the resnet family.
RUNS: list[Spec] = [
    Spec("resnet20", "clip", 4, 0, E),
    Spec("resnet20", "relu", None, 0, E),
    Spec("resnet20", "clip", 2, 0, E),
    *PRETRAINED,
    Spec("resnet20", "clip", 4, 1, E),
    Spec("resnet20", "relu", None, 1, E),
    Spec("vgg16", "relu", None, 0, E, overrides={"model.width": 0.25}, variant="w0.25"),
    Spec("vgg16", "clip", 4, 0, E, overrides={"model.width": 0.25}, variant="w0.25"),
    Spec("resnet20", "clip", 4, 2, E),
    Spec("resnet20", "relu", None, 2, E),
    _snn_finetune(BASE, 4, 2, 0.01),
    _snn_finetune(BASE_L2, 2, 2, 0.01),
    Spec("resnet20", "clip", 4, 0, 2 * E),
    Spec("cnn-fmnist", "clip", 4, 0, 4, config="fmnist-cnn.toml"),  # 4 spiking layers: the demo network
    Spec("cnn-fmnist", "relu", None, 0, 4, config="fmnist-cnn.toml"),
    Spec("resnet8", "clip", 4, 0, E),  # the family: gap against depth
    Spec("resnet14", "clip", 4, 0, E),
    Spec("resnet32", "clip", 4, 0, E),
    # per-channel λ (and so per-channel θ) from scratch, a candidate remedy: validation only
    Spec("resnet20", "clip", 4, 0, E, overrides={"model.per_channel": True}, variant="pc", test=False),
]


def spiking_layers(arch: str) -> int:
    from eclsnn import ThresholdClip
    from eclsnn.models import create

    if is_external(arch):
        _vision_libs()
    model = create(arch, num_classes=10, in_channels=1, activation="clip")
    return sum(isinstance(m, ThresholdClip) for m in model.modules())


def train(only: list[str] | None) -> None:
    for spec in RUNS:
        if only and spec.name not in only:
            continue
        print(f"[depth] {spec.name}: {'finished' if runs.is_finished(RUNS_DIR / spec.name) else 'training'}",
              flush=True)
        spec.ensure()


OUT = RESULTS / "depth"
T_MAX = 16  # dual θ/2 at T = 1..16
T_ABLATION = 8  # IF v(0) = 0 and IF θ/2 at T ≤ 8 (L = 4)
SJ_SELECT_SAMPLES = 2000  # SpikingJelly's setting is chosen on ≤ 2k validation images of seed 0 at T = 16


def _val_accuracy(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["val_acc"] for r in rows if "val_acc" in r]


def _sj_ready(model, calib):
    """``model`` and its calibration batches as SpikingJelly's converter takes them. It refuses a
    ``ZeroPad2d`` (the ``pad28`` stem of the zoo's VGG-16 on 28×28 images); a pad applied to the input first
    is the same network, so the pad node is cut out of the traced graph and applied to every batch (the
    returned function) instead."""
    gm = torch.fx.symbolic_trace(model)
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.ZeroPad2d) \
                and node.args[0].op == "placeholder":
            padding = gm.get_submodule(node.target).padding
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_all_unused_submodules()
            gm.recompile()

            def pad(x, padding=padding):
                return torch.nn.functional.pad(x, padding)

            return gm, [pad(x) for x in calib], pad
    return model, calib, lambda x: x


def _sj_select(model, calib, val, log) -> tuple[str, dict]:
    """SpikingJelly's best documented setting on the validation split (accuracy at T = 16)."""
    import accuracy_vs_peers as peers

    model, calib, pad = _sj_ready(model, calib)
    scores = {}
    for name, s in peers.SJ_VARIANTS.items():
        net = peers.sj_convert(model, calib, s["channel_wise"], s["half"])
        correct = total = 0
        for x, y in val:
            correct += (peers.sj_run(net, pad(x), T_MAX)[-1].argmax(-1) == y).sum().item()
            total += y.shape[0]
        scores[name] = correct / total
        log(f"  SpikingJelly {name}: validation {100 * scores[name]:.2f} % at T = {T_MAX}")
    best = max(scores, key=scores.get)
    return best, scores


def _sj_test(model, calib, setting: str, test, steps: int) -> dict[str, float]:
    import accuracy_vs_peers as peers

    s = peers.SJ_VARIANTS[setting]
    model, calib, pad = _sj_ready(model, calib)
    net = peers.sj_convert(model, calib, s["channel_wise"], s["half"])
    correct, total = torch.zeros(steps, dtype=torch.long), 0
    for x, y in test:
        correct += (peers.sj_run(net, pad(x), steps).argmax(-1) == y).sum(1)
        total += y.shape[0]
    return {str(t + 1): correct[t].item() / total for t in range(steps)}


def _sj_setting_file(spec: Spec) -> Path:
    """SpikingJelly's setting is chosen once per network family (on its seed-0 ReLU run)."""
    return OUT / ("sj_setting.json" if spec.arch == "resnet20" else f"sj_setting-{spec.tag}.json")


#: SpikingJelly's T on the pretrained path (its training-free conversion up to T = 32); elsewhere T_MAX
SJ_STEPS = {R18: 32}


def evaluate(spec: Spec, max_samples: int | None, log) -> dict | None:
    """The test-set numbers of one finished run (written once to results/depth/<run>.json)."""
    out = OUT / f"{spec.name}.json"
    if out.is_file():
        return json.loads(out.read_text())
    run = RUNS_DIR / spec.name
    if not runs.is_finished(run):
        log(f"[depth] {spec.name}: not trained yet")
        return None
    if not spec.test:
        log(f"[depth] {spec.name}: a candidate remedy, measured on the validation split only")
        return None
    if spec in FINETUNES and _r18_chosen_finetune() != spec.name:  # the test set sees the chosen one only
        log(f"[depth] {spec.name}: not evaluated (the fine-tune chosen on the validation split: "
            f"{_r18_chosen_finetune() or 'none yet, validate them first'})")
        return None
    log(f"[depth] {spec.name}: evaluating")
    if is_external(spec.arch):
        _vision_libs()
    torch.manual_seed(0)
    model, ckpt = load_ann(run)
    cfg = config_from_dict(ckpt.meta["config"])
    seed = cfg.train.seed
    test = list(eval_loader(*load_split(cfg.data, "test", seed, max_samples), 256))
    result = {"run": spec.name, "arch": spec.arch, "activation": spec.activation, "levels": spec.levels, "seed": seed,
              "epochs": spec.epochs, "variant": spec.variant, "val_accuracy": _val_accuracy(run), "num_samples": sum(y.shape[0] for _, y in test)}
    c = cfg.convert
    if spec.activation == "clip":
        main_variants = {"dual θ/2": convert(model, neuron="dual", v_init=0.5, theta_neg=c.theta_neg, maxpool=c.maxpool),
                         "burst θ/2": convert(model, neuron="burst", v_init=0.5, maxpool=c.maxpool),
                         "dual θ/2, burst after additions": burst_after_additions(
                             convert(model, neuron="dual", v_init=0.5, theta_neg=c.theta_neg, maxpool=c.maxpool))}
        ablation = {"IF v0": convert(model, neuron="if", v_init=0.0, maxpool=c.maxpool),
                    "IF θ/2": convert(model, neuron="if", v_init=0.5, maxpool=c.maxpool)} if spec.levels == 4 else {}
    else:  # thresholds from the validation split: the config's rule, and the 99.9th percentile beside it
        calib = calibration_batches(cfg.data, seed, 256, c.calibration_batches)
        main_variants = {
            f"dual θ/2 ({c.threshold_rule})": convert(model, calibration=calib, threshold_rule=c.threshold_rule,
                                                      percentile=c.percentile, maxpool=c.maxpool),
            "dual θ/2 (p99.9)": convert(model, calibration=calib, threshold_rule="percentile", percentile=99.9,
                                        maxpool=c.maxpool),
            "burst θ/2 (p99.9)": convert(model, neuron="burst", calibration=calib, threshold_rule="percentile",
                                         percentile=99.9, maxpool=c.maxpool),
        }
        ablation = {}
    acc = evaluate_variants(model, test, T_MAX, main_variants)
    result["ann_accuracy"] = acc["ann_accuracy"]
    result["snn_accuracy"] = acc["snn_accuracy"]
    if ablation:
        result["snn_accuracy"].update(evaluate_variants(model, test, T_ABLATION, ablation)["snn_accuracy"])
    if spec.activation == "relu":
        import accuracy_vs_peers as peers

        if peers.spikingjelly_version():
            val = list(eval_loader(*load_split(cfg.data, "val", seed, SJ_SELECT_SAMPLES), 256))
            setting = _sj_setting_file(spec)
            if seed == 0 or not setting.is_file():
                best, scores = _sj_select(model, calib, val, log)
                write_json(setting, {"chosen_on": spec.name, "setting": best, "validation": scores})
            best = json.loads(setting.read_text())["setting"]
            result["snn_accuracy"][f"SpikingJelly {best}"] = _sj_test(model, calib, best, test,
                                                                      SJ_STEPS.get(spec.arch, T_MAX))
            result["spikingjelly"] = peers.spikingjelly_version()
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    return result


def analysis(spec: Spec, log) -> None:
    """`eclsnn analyze` of the run at T = 2 and 4 on 512 validation images: where the error sits."""
    for T in (2, 4):
        out = OUT / f"{spec.name}-analysis-T{T}"
        if (out / "analysis.json").is_file() or not runs.is_finished(RUNS_DIR / spec.name):
            continue
        log(f"[depth] {spec.name}: analyze T = {T}")
        analyze_checkpoint(RUNS_DIR / spec.name, {"dual θ/2": {"neuron": "dual", "v_init": 0.5},
                                                  "IF θ/2": {"neuron": "if", "v_init": 0.5},
                                                  "burst θ/2": {"neuron": "burst", "v_init": 0.5}},
                           time_steps=T, split="val", max_samples=512, output=out, progress=False)


def burst_after_additions(snn):
    """``snn`` with the neurons that read a residual addition made burst neurons (the others stay dual):
    how much of the gap is the one-spike limit where two branches' currents meet."""
    import operator

    from eclsnn import BurstNeuron

    gm = snn.graph_module
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), eclsnn_neuron_types()):
            continue
        src = node.args[0]
        if isinstance(src, torch.fx.Node) and (src.target in (operator.add, torch.add, "add") or src.name.startswith("add")):
            old = gm.get_submodule(node.target)
            gm.add_submodule(node.target, BurstNeuron(old.theta, v_init=old.v_init))
    gm.recompile()
    snn.settings = {**snn.settings, "neuron": "dual, burst after additions"}
    return snn


def eclsnn_neuron_types():
    from eclsnn import DualThresholdIFNeuron, IFNeuron

    return (DualThresholdIFNeuron, IFNeuron)


VAL = OUT / "val"
T_VAL = 8


def validate(spec: Spec, log) -> dict | None:
    """Validation-split accuracy (all 6,000 images, dual θ/2, T = 1..8) of a finished clip run: how the
    remedies of the gap are chosen, without the test set (written once to results/depth/val/<run>.json)."""
    out = VAL / f"{spec.name}.json"
    run = RUNS_DIR / spec.name
    if out.is_file():
        done = json.loads(out.read_text())
        # a result belongs to one trained network: a retrained run (another machine gives other weights)
        # is validated again and the earlier result kept beside it
        if not runs.is_finished(run) or done.get("run_val_accuracy") == _val_accuracy(run)[-1]:
            return done
        earlier = VAL / "earlier-training"
        earlier.mkdir(exist_ok=True)
        out.rename(earlier / out.name)
    if spec.activation != "clip" or not runs.is_finished(run):
        return None
    log(f"[depth] {spec.name}: validation split")
    if is_external(spec.arch):
        _vision_libs()
    torch.manual_seed(0)
    model, ckpt = load_ann(run)
    cfg = config_from_dict(ckpt.meta["config"])
    val = list(eval_loader(*load_split(cfg.data, "val", cfg.train.seed), 256))
    mp = cfg.convert.maxpool
    acc = evaluate_variants(model, val, T_VAL, {
        "dual θ/2": convert(model, neuron="dual", v_init=0.5, theta_neg=cfg.convert.theta_neg, maxpool=mp),
        "burst θ/2": convert(model, neuron="burst", v_init=0.5, maxpool=mp),
        "dual θ/2, burst after additions": burst_after_additions(convert(model, neuron="dual", v_init=0.5, maxpool=mp))})
    result = {"run": spec.name, "arch": spec.arch, "levels": spec.levels, "seed": cfg.train.seed, "epochs": spec.epochs,
              "variant": spec.variant, "ann_accuracy": acc["ann_accuracy"], "snn_accuracy": acc["snn_accuracy"],
              "num_samples": sum(y.shape[0] for _, y in val), "run_val_accuracy": _val_accuracy(run)[-1]}
    VAL.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    return result


def render_validation() -> list[str]:
    results = [json.loads(p.read_text()) for p in sorted(VAL.glob("*.json"))]
    if not results:
        return []
    lines = ["", "## Closing the gap: the remedies on the validation split", "",
             f"Command: `python benchmarks/depth.py validate`. Validation accuracy in % ({results[0]['num_samples']} "
             "images, one standard error ≈ 0.4 points), seed 0; the test set is not used to choose. The fine-tuned "
             "runs (`snn2-ft`) are 2 more epochs of the 10-epoch run with the SNN in the loop at T = 2; their ANN is "
             "the fine-tuned one.", "",
             "| run | ANN | neurons | " + " | ".join(f"T={t}" for t in range(1, T_VAL + 1)) + " | ANN − SNN at T=2 | at T=4 |",
             "|---|---|---|" + "---|" * (T_VAL + 2)]
    for r in results:
        for variant, snn in r["snn_accuracy"].items():
            lines.append(f"| {r['run']} | {100 * r['ann_accuracy']:.2f} | {variant} | "
                         + " | ".join(f"{100 * snn[str(t)]:.2f}" for t in range(1, T_VAL + 1))
                         + f" | {100 * (r['ann_accuracy'] - snn['2']):.2f} | {100 * (r['ann_accuracy'] - snn['4']):.2f} |")
    return lines


PREPARE_SAMPLES = 2000
PREPARE_SETTINGS = [(4, 99.9, False), (4, 99.0, False), (4, 99.99, False), (4, 99.9, True), (4, 99.0, True),
                    (8, 99.9, False), (64, 99.9, False)]


def prepare_loss(log) -> dict | None:
    """What the threshold clip costs the pretrained ReLU network before any fine-tuning: validation accuracy
    (first 2,000 images) of ``eclsnn.prepare`` at L levels, λ from a percentile per layer or per channel (of
    8 batches of validation images) — the evidence behind the fine-tunes tried (results/depth/r18-prepare.json)."""
    out = OUT / "r18-prepare.json"
    if out.is_file():
        return json.loads(out.read_text())
    run = RUNS_DIR / R18_RELU
    if not runs.is_finished(run):
        return None
    from eclsnn import prepare

    _vision_libs()
    log(f"[depth] {R18_RELU}: the clip before fine-tuning")
    model, ckpt = load_ann(run)
    cfg = config_from_dict(ckpt.meta["config"])
    val = list(eval_loader(*load_split(cfg.data, "val", cfg.train.seed, PREPARE_SAMPLES), 250))
    calib = calibration_batches(cfg.data, cfg.train.seed, cfg.train.batch_size, cfg.train.init_calibration_batches)

    @torch.no_grad()
    def accuracy(m) -> float:
        m.eval()
        return sum((m(x).argmax(-1) == y).sum().item() for x, y in val) / sum(y.shape[0] for _, y in val)

    result = {"run": R18_RELU, "num_samples": sum(y.shape[0] for _, y in val), "relu": accuracy(model), "prepared": [
        {"levels": L, "percentile": p, "per_channel": pc,
         "accuracy": accuracy(prepare(model, levels=L, calibration=calib, percentile=p, per_channel=pc))}
        for L, p, pc in PREPARE_SETTINGS]}
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    return result


def render_pretrained() -> list[str]:
    """The pretrained path: ReLU resnet18 → clip fine-tune → SNN, against SpikingJelly on the ReLU network
    and the clip network trained from scratch with the same total budget."""
    results = {r["run"]: r for r in (json.loads(p.read_text()) for p in sorted(OUT.glob("fmnist-*torchvision-resnet18*.json")))}
    relu = results.get(R18_RELU)
    if relu is None:
        return []
    chosen = _r18_chosen_finetune()
    steps = [1, 2, 4, 8, 16, 32]
    lines = ["", "## The pretrained path: torchvision's resnet18", "",
             f"Config: configs/fmnist-resnet18.toml. The ReLU network ({R18_EPOCHS} epochs) stands in for a downloaded "
             f"one; the fine-tune is {R18_EPOCHS // 4} epochs with the threshold clip from it (train.init_from). Its "
             "settings were chosen on the validation split (dual θ/2 at T = 4, `benchmarks/depth.py validate`) among "
             "the fine-tunes of `FINETUNES`, tried in that order" + (f": {chosen}" if chosen else "") + ". A fine-tune "
             "listed here but not chosen was the choice among those tried before it, evaluated then. The clip network "
             f"from scratch has the same total budget ({R18_EPOCHS + R18_EPOCHS // 4} epochs). Test accuracy in %.", "",
             "| network | ANN | SNN | " + " | ".join(f"T={t}" for t in steps) + " | ReLU ANN − SNN at T=4 |",
             "|---|---|---|" + "---|" * (len(steps) + 1)]
    for run, r in results.items():
        name = ("ReLU" if r["activation"] == "relu" else "clip from scratch" if not r.get("variant")
                else f"clip fine-tune ({r['variant']})" + (", chosen" if run == chosen else ""))
        for variant, snn in r["snn_accuracy"].items():
            if variant.startswith(("burst", "IF", "dual θ/2, burst")):
                continue
            cells = [f"{100 * snn[str(t)]:.2f}" if str(t) in snn else "" for t in steps]
            gap = f"{100 * (relu['ann_accuracy'] - snn['4']):.2f}" if "4" in snn else ""
            lines.append(f"| {name} | {100 * r['ann_accuracy']:.2f} | {variant} | " + " | ".join(cells) + f" | {gap} |")
    prep = OUT / "r18-prepare.json"
    if prep.is_file():
        p = json.loads(prep.read_text())
        lines += ["", f"Before any fine-tuning (`python benchmarks/depth.py prepare-loss`; validation, first "
                  f"{p['num_samples']} images): the ReLU network {100 * p['relu']:.2f} %; after `eclsnn.prepare`: "
                  + "; ".join(f"L = {q['levels']}, {'per channel' if q['per_channel'] else 'per layer'} p{q['percentile']:g}: "
                              f"{100 * q['accuracy']:.2f}" for q in p["prepared"]) + "."]
    return lines


def _r18_chosen_finetune() -> str | None:
    """The fine-tune whose SNN (dual θ/2, T = 4) is the most accurate on the validation split (None until
    every fine-tune is validated)."""
    scores = {}
    for spec in FINETUNES:
        f = VAL / f"{spec.name}.json"
        if not f.is_file():
            return None
        scores[spec.name] = json.loads(f.read_text())["snn_accuracy"]["dual θ/2"]["4"]
    return max(scores, key=scores.get)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    m = 100 * statistics.fmean(values)
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {100 * statistics.stdev(values):.2f}"


def render() -> str:
    results = [json.loads(p.read_text()) for p in sorted(OUT.glob("fmnist-*.json"))]
    lines = ["# Depth on Fashion-MNIST", "",
             "Commands: `nice -n 19 python benchmarks/depth.py train`, `... evaluate`, `... render`; settings in "
             "configs/fmnist-resnet20.toml (fixed before any test-set run). Test accuracy in % (mean ± std over seeds "
             "where there are several); the SNN columns are the accuracy after t steps of one T-step run.", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["arch"], r["activation"], r["levels"], r["epochs"], r.get("variant", "")), []).append(r)
    steps = [1, 2, 4, 8, 16]
    lines += ["| network | epochs | seeds | ANN | variant | " + " | ".join(f"T={t}" for t in steps) + " | gap at T=2 | gap at T=4 |",
              "|---|---|---|---|---|" + "---|" * (len(steps) + 2)]
    for (arch, act, levels, epochs, variant_), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        name = f"{arch} {'ReLU' if act == 'relu' else f'clip L={levels}'}" + (f" + {variant_}" if variant_ else "")
        ann = [r["ann_accuracy"] for r in rs]
        for variant in rs[0]["snn_accuracy"]:
            cells = []
            for t in steps:
                vals = [r["snn_accuracy"][variant][str(t)] for r in rs if str(t) in r["snn_accuracy"].get(variant, {})]
                cells.append(_mean_std(vals))
            gaps = []
            for t in (2, 4):
                vals = [r["ann_accuracy"] - r["snn_accuracy"][variant][str(t)] for r in rs
                        if str(t) in r["snn_accuracy"].get(variant, {})]
                gaps.append(_mean_std(vals))
            lines.append(f"| {name} | {epochs} | {len(rs)} | {_mean_std(ann)} | {variant} | " + " | ".join(cells)
                         + f" | {gaps[0]} | {gaps[1]} |")
    conv = [r for r in results if r["seed"] == 0 and r["activation"] == "clip" and r["levels"] == 4
            and not r.get("variant")]
    if conv:
        lines += ["", "Budget check (seed 0, L = 4; validation accuracy of the last epoch, %):", ""]
        for r in sorted(conv, key=lambda r: r["epochs"]):
            lines.append(f"- {r['arch']}, {r['epochs']} epochs: {100 * r['val_accuracy'][-1]:.2f} "
                         f"(best {100 * max(r['val_accuracy']):.2f})")
    for sj in sorted(OUT.glob("sj_setting*.json")):
        s = json.loads(sj.read_text())
        lines += ["", f"SpikingJelly's setting, chosen on ≤ {SJ_SELECT_SAMPLES} validation images of {s['chosen_on']} at "
                  f"T = {T_MAX}: {s['setting']} (" + ", ".join(f"{k}: {100 * v:.2f}" for k, v in s["validation"].items()) + ")."]
    lines += render_pretrained()
    lines += render_validation()
    for path in sorted(OUT.glob("*-analysis-T*/analysis.md")):
        lines += ["", f"## `eclsnn analyze`: {path.parent.name} (512 validation images)", "", path.read_text()]
    return "\n".join(lines) + "\n"


#: the recipe changes that still belong on the depth plot (a narrower VGG is another network, not a remedy)
PLOTTED_VARIANTS = ("", "w0.25")


def plot(path: Path) -> None:
    """Gap at T = 2 and 4 (dual θ/2, clip L = 4, budget E) against the number of spiking layers: to the
    network's own quantised ANN (left) and to its ReLU twin's ANN, same seed and budget (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def key(r: dict) -> tuple:
        return r["arch"], r.get("variant", ""), r["seed"], r["epochs"]

    results = [json.loads(p.read_text()) for p in sorted(OUT.glob("fmnist-*.json"))]
    relu = {key(r): r for r in results if r["activation"] == "relu"}
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        if (r["activation"] == "clip" and r["levels"] == 4 and r.get("variant", "") in PLOTTED_VARIANTS
                and r["epochs"] == (4 if r["arch"] == "cnn-fmnist" else E)):
            rows.setdefault((r["arch"], r.get("variant", "")), []).append(r)
    if not rows:
        return
    layers = {k: spiking_layers(k[0]) for k in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, against in zip(axes, ("own", "relu")):
        for t, marker in ((2, "o"), (4, "s")):
            xs, ys, es, names = [], [], [], []
            for k in sorted(rows, key=layers.get):
                gaps = [100 * ((r if against == "own" else relu[key(r)])["ann_accuracy"]
                               - r["snn_accuracy"]["dual θ/2"][str(t)])
                        for r in rows[k] if against == "own" or key(r) in relu]
                if gaps:
                    xs.append(layers[k])
                    ys.append(statistics.fmean(gaps))
                    es.append(statistics.stdev(gaps) if len(gaps) > 1 else 0.0)
                    names.append(k[0].replace("torchvision:", "tv:") + (f" {k[1]}" if k[1] else ""))
            # the registry's resnet family (one design, depth varied) is one line; other networks are
            # single points beside it, not joined to it
            fam = [i for i, n in enumerate(names) if n.startswith("resnet")]
            other = [i for i in range(len(names)) if i not in fam]
            color = "C0" if t == 2 else "C1"
            if fam:
                ax.errorbar([xs[i] for i in fam], [ys[i] for i in fam], yerr=[es[i] for i in fam], marker=marker,
                            capsize=3, color=color, label=f"T = {t}, resnet family")
            if other:
                ax.errorbar([xs[i] for i in other], [ys[i] for i in other], yerr=[es[i] for i in other],
                            marker=marker, capsize=3, color=color, linestyle="none", mfc="none",
                            label=f"T = {t}, other networks")
            for x, y, name in zip(xs, ys, names):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("spiking layers")
        ax.set_title("to its own quantised ANN" if against == "own" else "to the ReLU twin's ANN (same seed, budget)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("ANN − SNN test accuracy (points)")
    fig.suptitle("Fashion-MNIST, ThresholdClip L = 4, dual θ/2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["all", "train", "validate", "evaluate", "render", "list", "prepare-loss"],
                   help="all: train, validate and evaluate each run in turn (results are written as runs finish)")
    p.add_argument("--only", nargs="*", help="run names (see `list`)")
    p.add_argument("--max-samples", type=int, help="seeded test subset (default: the whole test set)")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    if a.phase == "list":
        for spec in RUNS:
            print(spec.name, "finished" if runs.is_finished(RUNS_DIR / spec.name) else "")
    elif a.phase == "train":
        train(a.only)
    elif a.phase == "all":
        log = lambda m: print(m, flush=True)  # noqa: E731
        for spec in RUNS:
            if a.only and spec.name not in a.only:
                continue
            train([spec.name])
            validate(spec, log)
            evaluate(spec, a.max_samples, log)
            if spec.arch == "resnet20" and spec.activation == "clip" and spec.seed == 0 and spec.epochs == E:
                analysis(spec, log)
    elif a.phase == "prepare-loss":
        prepare_loss(lambda m: print(m, flush=True))
    elif a.phase == "validate":
        for spec in RUNS:
            if not a.only or spec.name in a.only:
                validate(spec, lambda m: print(m, flush=True))
    elif a.phase == "evaluate":
        for spec in RUNS:
            if not a.only or spec.name in a.only:
                evaluate(spec, a.max_samples, lambda m: print(m, flush=True))
                if spec.arch == "resnet20" and spec.activation == "clip" and spec.seed == 0 and spec.epochs == E:
                    analysis(spec, lambda m: print(m, flush=True))
    if a.phase in ("all", "validate", "evaluate", "render", "prepare-loss"):
        md = render()
        (RESULTS / "depth.md").write_text(md)
        write_json(RESULTS / "depth.json", [json.loads(p.read_text()) for p in sorted(OUT.glob("fmnist-*.json"))])
        plot(RESULTS / "depth.png")
        print(md)


if __name__ == "__main__":
    main()
