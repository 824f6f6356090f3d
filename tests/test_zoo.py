"""Networks people have: a representative subset of benchmarks/zoo_coverage.py's matrix, with random
weights and small inputs — models from torchvision and timm, each max-pool mode, ReLU6, refused models,
models by name and their checkpoints — asserting the exact identities where the maths says exact.

torchvision and timm come from tests/requirements-zoo.txt (``make test`` installs them with --no-deps and
sets ECLSNN_REQUIRE_ZOO=1, so there these tests run and are never skipped)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eclsnn
from eclsnn.config import load_config
from eclsnn.conversion.converter import fold_batchnorm
from eclsnn.conversion.graph import normalise, trace
from eclsnn.core.clip import ThresholdClip
from eclsnn.errors import ConfigError, ConversionError
from eclsnn.io.checkpoint import build_model, load_checkpoint, save_checkpoint
from eclsnn.models import create

import vision_libs

if not vision_libs.vision_libs_available() and not os.environ.get("ECLSNN_REQUIRE_ZOO"):
    pytest.skip("torchvision and timm are not installed: pip install --no-deps -r tests/requirements-zoo.txt "
                "(make test does)", allow_module_level=True)
tv, timm = vision_libs.import_vision_libs()

L = 4


def calibrated(model: nn.Module, side: int = 32, n: int = 32) -> nn.Module:
    """``model`` with BatchNorm statistics from synthetic images (random weights, a trained network's scale)."""
    return vision_libs.recalibrate_batchnorm(model, vision_libs.synthetic_images(n, 1, side), batch_size=16)


def folded(prepared: nn.Module) -> nn.Module:
    return fold_batchnorm(normalise(trace(prepared)))


def test_torchvision_resnet18_unchanged_swap_first_layer_counts_equal_the_quantised_ann():
    """prepare → convert → simulate on torchvision's resnet18 as it comes. With maxpool="swap" the stem pool
    moves in front of its ReLU, so the first neuron layer sees a static current z: after T = L steps from
    v(0) = θ/2 its count is floor(z·L/λ + 1/2), clamped to [0, L] — the quantised clip of the prepared ANN,
    element for element, except where z·L/λ lies within float rounding of a boundary n − 1/2."""
    torch.manual_seed(0)
    model = calibrated(tv.models.resnet18(num_classes=10))
    x, cal = vision_libs.synthetic_images(4, 3, 32), vision_libs.synthetic_images(32, 2, 32)
    prepared = eclsnn.prepare(model, levels=L, calibration=cal)
    snn = eclsnn.convert(prepared, maxpool="swap")
    assert snn.settings["maxpool_modes"] == {"maxpool": "static"}  # prepare already swapped it: exact
    first = next(name for name, _ in snn.neurons())

    ann = folded(prepared)
    seen = {}
    clip = ann.get_submodule(first)
    assert isinstance(clip, ThresholdClip)
    hook = clip.register_forward_hook(lambda m, inp, out: seen.update(z=inp[0], q=out))
    with torch.no_grad():
        ann(x)
    hook.remove()
    snn.add_observer(lambda name, node, xs, out: seen.setdefault(name, out))
    out = eclsnn.simulate(snn, x, L)
    assert torch.isfinite(out).all() and out.shape == (L, 4, 10)

    lam = clip.threshold.detach()
    theta = dict(snn.neurons())[first].theta
    assert torch.equal(theta, lam)
    counts = torch.round(seen[first] / theta).sum(0)
    levels = torch.round(seen["q"] * L / lam)
    u = seen["z"] * L / lam
    boundary = ((u - (torch.round(u - 0.5) + 0.5)).abs() < 1e-5 * L) & (u > 0) & (u < L)
    mismatch = counts != levels
    n_boundary = int(boundary.sum())
    print(f"\nresnet18 swap, first spiking layer {first}: {counts.numel()} elements, {n_boundary} within 1e-5·λ of a "
          f"rounding boundary, {int(mismatch.sum())} differ (all of them on a boundary)")
    assert not (mismatch & ~boundary).any()
    assert n_boundary <= max(2, counts.numel() // 10_000)
    assert levels.max() > 0 and levels.min() == 0  # the identity is not vacuous


def test_torchvision_resnet18_relu_network_converts_with_the_exact_swap():
    """The ReLU network itself (θ from calibration): the stem pool's swap is exact (static input), so the
    default policy "error" converts it."""
    torch.manual_seed(0)
    model = calibrated(tv.models.resnet18(num_classes=10))
    snn = eclsnn.convert(model, calibration=vision_libs.synthetic_images(16, 2, 32))
    assert snn.settings["maxpool_modes"] == {"maxpool": "swap"}
    ann = model(vision_libs.synthetic_images(4, 3, 32))
    out = eclsnn.simulate(snn, vision_libs.synthetic_images(4, 3, 32), 2)
    assert out.shape == (2, *ann.shape)


def test_squeezenet_pool_modes_error_auto_avg():
    """SqueezeNet's pools (ceil_mode=True) follow Fire concatenations: "error" refuses them with the modes,
    "auto" takes them exactly on the SNN's counts (cummax, per-channel θ of the concatenation), "avg" warns."""
    torch.manual_seed(0)
    model = calibrated(tv.models.squeezenet1_1(num_classes=10))
    cal, x = vision_libs.synthetic_images(16, 2, 32), vision_libs.synthetic_images(2, 3, 32)
    with pytest.raises(ConversionError, match=r"(?s)2 max pool\(s\) with maxpool='error'.*features.5.*'auto', 'swap', 'cummax' or 'avg'"):
        eclsnn.convert(model, calibration=cal)
    snn = eclsnn.convert(model, calibration=cal, maxpool="auto")  # the stem pool's swap is exact; then cummax
    assert snn.settings["maxpool_modes"] == {"features.2": "swap", "features.5": "cummax", "features.8": "cummax"}
    seen = {}
    snn.add_observer(lambda name, node, xs, out: seen.setdefault(name, (xs, out)))
    eclsnn.simulate(snn, x, 6)
    pool = snn.graph_module.get_submodule("features.5")
    xs, out = seen["features.5"]
    theta = pool.theta.view(1, 1, -1, 1, 1) if pool.theta.dim() == 1 else pool.theta
    counts = torch.round(xs / theta).sum(0)
    assert torch.equal(torch.round(out / theta).sum(0), F.max_pool2d(counts, 3, 2, ceil_mode=True))
    with pytest.warns(UserWarning, match="approximately"):
        avg = eclsnn.convert(model, calibration=cal, maxpool="avg")
    assert set(avg.settings["maxpool_modes"].values()) == {"avg"}


def test_googlenet_auto_takes_pools_on_spiking_pools():
    torch.manual_seed(0)
    model = calibrated(tv.models.googlenet(num_classes=10, aux_logits=False, init_weights=True), n=16)
    snn = eclsnn.convert(model, calibration=vision_libs.synthetic_images(8, 2, 32), maxpool="auto")
    modes = snn.settings["maxpool_modes"]
    assert modes["maxpool1"] == "swap" and modes["inception3a.branch4.0"] == "cummax"
    assert eclsnn.simulate(snn, vision_libs.synthetic_images(2, 3, 32), 2).shape == (2, 2, 10)


def test_mobilenet_v2_relu6_becomes_neurons_capped_at_6():
    torch.manual_seed(0)
    model = calibrated(tv.models.mobilenet_v2(num_classes=10), n=16)
    cal = vision_libs.synthetic_images(8, 2, 32) * 20  # activations above the cap
    relu6 = sum(isinstance(m, nn.ReLU6) for m in model.modules())
    prepared = eclsnn.prepare(model, levels=L, calibration=cal)
    clips = [m for m in prepared.modules() if isinstance(m, ThresholdClip)]
    assert len(clips) == relu6 and all(float(c.threshold) <= 6.0 for c in clips)
    snn = eclsnn.convert(model, calibration=cal)
    thetas = [float(n.theta.max()) for _, n in snn.neurons()]
    assert len(thetas) == relu6 and max(thetas) == 6.0


def test_timm_batchnorm_act_folds_and_resnet_d_stem_pool_is_a_spiking_pool():
    torch.manual_seed(0)
    cal = vision_libs.synthetic_images(8, 2, 32)
    mb = calibrated(timm.create_model("mobilenetv2_050", num_classes=10), n=16)
    prepared = eclsnn.prepare(mb, levels=L, calibration=cal)
    f = folded(prepared)
    assert not any(n.target is F.batch_norm for n in f.graph.nodes)  # BatchNormAct2d folded away
    torch.testing.assert_close(f(cal), prepared(cal), rtol=1e-4, atol=1e-4)
    assert eclsnn.convert(prepared).settings.get("maxpool_modes") is None
    # ResNet-D's deep stem has neurons before its max pool: its input varies in time, so the default
    # ("error": exact modes only) refuses it and "auto" takes the spiking max pool
    rd = calibrated(timm.create_model("resnet18d", num_classes=10), n=16)
    with pytest.raises(ConversionError, match="maxpool: max pooling on time-varying input"):
        eclsnn.convert(rd, calibration=cal)
    snn = eclsnn.convert(rd, calibration=cal, maxpool="auto")
    assert snn.settings["maxpool_modes"] == {"maxpool": "cummax"}


def test_timm_vgg_traces_with_an_example_and_converts():
    """timm's VGG classifier block branches on the feature map's size: tracing needs an example (a
    calibration tensor serves); the traced ANN computes exactly what the model does."""
    torch.manual_seed(0)
    model = timm.create_model("vgg11_bn", num_classes=10, mlp_ratio=1 / 64).eval()  # a 64-wide hidden layer
    x = vision_libs.synthetic_images(2, 3, 32)
    with pytest.raises(ConversionError, match=r"'pre_logits' \(ConvMlp\).*example_input="):
        eclsnn.prepare(model)
    assert torch.equal(trace(model, example_input=x)(x), model(x))
    prepared = eclsnn.prepare(model, levels=L, calibration=x)
    snn = eclsnn.convert(prepared, maxpool="auto", example_input=x)
    assert set(snn.settings["maxpool_modes"].values()) == {"static", "cummax"}


@pytest.mark.parametrize("arch, why", [
    ("torchvision:mobilenet_v3_small", r"Hardswish is not monotone.*hard sigmoid \(gate\)"),
    ("torchvision:regnet_y_400mf", r"sigmoid \(gate\).*product of two activations"),
    ("timm:convnext_atto", r"layer_norm divides by a statistic.*GELU"),
])
def test_refused_models_say_why(arch, why):
    model = create(arch, num_classes=10, activation="relu", pool="max").eval()
    with pytest.raises(ConversionError, match=f"(?s)unsupported operations:.*{why}"):
        eclsnn.convert(model, calibration=vision_libs.synthetic_images(2, 2, 32), maxpool="auto")


def test_models_by_name_adapted_input_and_checkpoint_round_trip(tmp_path):
    x = torch.randn(2, 1, 28, 28)
    for arch, kwargs in (("torchvision:resnet18", dict(activation="clip", pool="max")),
                         ("timm:resnet18d", dict(activation="relu", pool="avg"))):
        meta = dict(arch=arch, num_classes=10, levels=L, init_threshold=2.0, in_channels=1, stem="small", **kwargs)
        args = dict(meta)
        torch.manual_seed(0)
        model = create(args.pop("arch"), **args).eval()
        assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())  # stem pool dropped / avg pools
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert (first.in_channels, first.kernel_size, first.stride) == (1, (3, 3), (1, 1))
        y = model(x)
        assert y.shape == (2, 10)
        save_checkpoint(tmp_path / arch.replace(":", "-"), model, {"model": meta})
        again = build_model(load_checkpoint(tmp_path / arch.replace(":", "-")))
        assert torch.equal(again(x), y)


def test_model_names_are_checked_against_the_registries(monkeypatch):
    assert load_config(overrides={"model.arch": "timm:resnet18d", "model.stem": "small"}).model.arch == "timm:resnet18d"
    with pytest.raises(ConfigError, match=r"did you mean 'torchvision:resnet18'"):
        load_config(overrides={"model.arch": "torchvision:resnet18x"})
    with pytest.raises(ConfigError, match="external models are named"):
        create("torchvision:", num_classes=10)
    with pytest.raises(ConfigError, match="stem"):
        create("torchvision:resnet18", num_classes=10, stem="cifar")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ConfigError, match=r"needs timm, which could not be imported.*pip install timm"):
        load_config(overrides={"model.arch": "timm:resnet18"})


def test_vision_libs_shim_is_inert_where_torchvision_imports(monkeypatch):
    """Where ``import torchvision`` works, import_vision_libs defines nothing."""
    import importlib

    calls = []
    monkeypatch.setattr(vision_libs, "_define_schemas", lambda: calls.append(1))
    monkeypatch.setattr(importlib, "import_module", lambda name: tv if name == "torchvision" else None)
    assert vision_libs._import_torchvision() is tv and calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vision_libs.version("timm") == timm.__version__
