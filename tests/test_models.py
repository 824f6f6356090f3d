"""The model zoo: registry, shapes, and the structure the converter relies on (fx-traceable, one
activation module per layer, conv → BN → activation, residual addition before the activation)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from eclsnn import ThresholdClip
from eclsnn.errors import ConfigError
from eclsnn.models import MODEL_DEFAULTS, create, input_size, list_models, make_activation, register
from eclsnn.models import registry as registry_module

MODELS = ["cnn-fmnist", "resnet18", "resnet20", "resnet34", "vgg16"]
#: Activation layers per model: conv layers + hidden linear layers, stems included.
ACTIVATION_COUNT = {
    "cnn-fmnist": 3 + 1,
    "vgg16": 13 + 2,
    "resnet18": 1 + 2 * 8,
    "resnet20": 1 + 2 * 9,
    "resnet34": 1 + 2 * 16,
}
ACT_TYPES = {"clip": ThresholdClip, "relu": nn.ReLU}
#: Every module type the zoo may put in a traced graph.
KNOWN_LEAVES = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.Linear,
    ThresholdClip,
    nn.ReLU,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)


class ClipLeafTracer(fx.Tracer):
    """The converter's view: ThresholdClip is one opaque node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ThresholdClip) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, ClipLeafTracer().trace(model))


def modules_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def example_input(name: str, batch: int = 2, stem: str | None = None) -> torch.Tensor:
    return torch.randn(batch, *input_size(name, stem))


# ---------------------------------------------------------------------------------------------------
# registry


def test_list_models_sorted_and_complete():
    names = list_models()
    assert names == sorted(names)
    assert set(MODELS) <= set(names)


@pytest.mark.parametrize("name", MODELS)
def test_model_defaults_describe_input(name):
    d = MODEL_DEFAULTS[name]
    assert {"in_channels", "image_size", "stem", "stems"} <= set(d)
    assert input_size(name) == (d["in_channels"], d["image_size"], d["image_size"])
    for stem, side in d["stems"].items():
        assert input_size(name, stem) == (d["in_channels"], side, side)


def test_cnn_fmnist_defaults():
    assert MODEL_DEFAULTS["cnn-fmnist"]["in_channels"] == 1
    assert MODEL_DEFAULTS["cnn-fmnist"]["image_size"] == 28
    assert input_size("resnet18", "imagenet") == (3, 224, 224)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"name": "resnet-18"}, ["resnet-18", "resnet18", "vgg16", "cnn-fmnist"]),
        ({"name": "resnet18", "activation": "gelu"}, ["gelu", "clip", "relu"]),
        ({"name": "vgg16", "pool": "lp"}, ["lp", "avg", "max"]),
        ({"name": "resnet20", "stem": "imagenet"}, ["imagenet", "cifar"]),
        ({"name": "resnet18", "stem": "tiny"}, ["tiny", "cifar", "imagenet"]),
        ({"name": "cnn-fmnist", "stem": "cifar"}, ["cnn-fmnist", "cifar"]),
        ({"name": "resnet20", "num_classes": 0}, ["num_classes"]),
        ({"name": "resnet20", "dropout": 1.0}, ["dropout"]),
        ({"name": "resnet20", "levels": -1}, ["levels"]),
        ({"name": "resnet20", "levels": 2.5}, ["levels"]),
        ({"name": "resnet20", "init_threshold": 0.0}, ["init_threshold"]),
        ({"name": "resnet20", "in_channels": 0}, ["in_channels"]),
        ({"name": "resnet20", "width": 0.5}, ["resnet20", "width", "vgg16"]),
        ({"name": "vgg16", "width": 0.0}, ["width", "(0, 64]"]),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, words):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ConfigError) as info:
        create(**kwargs)
    assert isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value)


def test_input_size_unknown_model():
    with pytest.raises(ConfigError, match="available models"):
        input_size("nope")


def test_register_custom_model():
    name = "test-tiny-mlp"

    @register(name, {"in_channels": 1, "image_size": 4})
    def tiny(num_classes, activation, levels, init_threshold, per_channel, in_channels, pool, stem, dropout):
        act = make_activation(activation, levels, init_threshold, per_channel, 8)
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 16, 8), act, nn.Linear(8, num_classes))

    try:
        assert name in list_models()
        model = create(name, 3, activation="relu")
        assert model(torch.randn(2, *input_size(name))).shape == (2, 3)
        with pytest.raises(ConfigError, match="already registered"):
            register(name)(tiny)
    finally:
        registry_module._REGISTRY.pop(name, None)
        MODEL_DEFAULTS.pop(name, None)
    assert name not in list_models()


# ---------------------------------------------------------------------------------------------------
# activations


def test_make_activation():
    clip = make_activation("clip", levels=8, init_threshold=2.0)
    assert isinstance(clip, ThresholdClip) and clip.levels == 8
    assert torch.allclose(clip.threshold, torch.tensor(2.0))
    per = make_activation("clip", per_channel=True, num_channels=5)
    assert per.threshold_raw.shape == (5,)
    assert isinstance(make_activation("relu"), nn.ReLU)
    assert make_activation("clip") is not make_activation("clip")
    with pytest.raises(ConfigError, match="'tanh'.*clip, relu"):
        make_activation("tanh")


@pytest.mark.parametrize("levels", [None, 0, 2, 8])
def test_clip_settings_reach_every_layer(levels):
    model = create("resnet20", 10, levels=levels, init_threshold=2.0)
    clips = [m for m in model.modules() if isinstance(m, ThresholdClip)]
    assert all(c.levels == (levels or None) for c in clips)
    assert all(torch.allclose(c.threshold, torch.tensor(2.0)) for c in clips)


@pytest.mark.parametrize("name, widths", [("resnet20", {16, 32, 64}), ("cnn-fmnist", {32, 64, 128})])
def test_per_channel_thresholds_have_channel_width(name, widths):
    model = create(name, 10, per_channel=True)
    # λ is materialised at construction, so an optimizer can be built before the first forward pass
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())
    clips = [m for m in model.modules() if isinstance(m, ThresholdClip)]
    assert len(clips) == ACTIVATION_COUNT[name]
    assert {c.threshold_raw.shape for c in clips} == {(w,) for w in widths}
    assert model(example_input(name)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------
# every model: shape, activation count and the structure the converter relies on


@pytest.mark.parametrize("activation", ["clip", "relu"])
@pytest.mark.parametrize("name", MODELS)
def test_model_shape_trace_and_structure(name, activation):
    torch.manual_seed(0)
    model = create(name, 10, activation=activation).eval()
    x = example_input(name)
    y = model(x)
    assert y.shape == (2, 10)

    acts = [m for m in model.modules() if isinstance(m, ACT_TYPES[activation])]
    assert len(acts) == ACTIVATION_COUNT[name]
    other = ACT_TYPES["relu" if activation == "clip" else "clip"]
    assert not any(isinstance(m, other) for m in model.modules())

    gm = trace(model)
    torch.testing.assert_close(gm(x), y)
    nodes = list(gm.graph.nodes)

    # no functional activations; only known leaf modules
    for node in nodes:
        if node.op in ("call_function", "call_method"):
            assert "relu" not in str(node.target).lower(), node.format_node()
            assert node.target not in (F.relu, torch.relu, torch.clamp, torch.clip), node.format_node()
        if node.op == "call_module":
            assert isinstance(modules_of(gm, node), KNOWN_LEAVES), node.target

    # every activation module is called exactly once, and all of them are in the graph
    calls = [n.target for n in nodes if isinstance(modules_of(gm, n), ACT_TYPES[activation])]
    assert len(calls) == len(set(calls)) == ACTIVATION_COUNT[name]

    # BatchNorm directly after the bias-free convolution it folds into, used by nothing else
    for node in nodes:
        if isinstance(modules_of(gm, node), nn.BatchNorm2d):
            (src,) = node.all_input_nodes
            conv = modules_of(gm, src)
            assert isinstance(conv, nn.Conv2d) and conv.bias is None, node.target
            assert len(src.users) == 1
    for node in nodes:
        if isinstance(modules_of(gm, node), nn.Conv2d):
            assert all(isinstance(modules_of(gm, user), nn.BatchNorm2d) for user in node.users), node.target

    # the readout is a plain Linear, nothing after it
    (out,) = [n for n in nodes if n.op == "output"]
    assert isinstance(modules_of(gm, out.args[0]), nn.Linear)

    # average pooling by default
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize("name, blocks", [("resnet18", 8), ("resnet20", 9), ("resnet34", 16)])
def test_residual_addition_before_activation(name, blocks):
    gm = trace(create(name, 10))
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert len(adds) == blocks
    for add in adds:
        (user,) = add.users
        assert isinstance(modules_of(gm, user), ThresholdClip)
        # one input is the main branch's BN, the other the shortcut (BN of a 1×1 conv, or the block input)
        assert isinstance(modules_of(gm, add.args[0]), nn.BatchNorm2d)


@pytest.mark.parametrize("name, stem", [("cnn-fmnist", None), ("vgg16", None), ("resnet18", "imagenet")])
def test_max_pool_option(name, stem):
    avg = create(name, 10, stem=stem)
    mx = create(name, 10, stem=stem, pool="max")
    n_avg = sum(isinstance(m, nn.AvgPool2d) for m in avg.modules())
    assert n_avg > 0
    assert sum(isinstance(m, nn.MaxPool2d) for m in mx.modules()) == n_avg
    assert not any(isinstance(m, nn.AvgPool2d) for m in mx.modules())
    assert avg.state_dict().keys() == mx.state_dict().keys()


@pytest.mark.parametrize("name", ["cnn-fmnist", "vgg16", "resnet20"])
def test_dropout_option_keeps_parameter_names(name):
    plain = create(name, 10)
    drop = create(name, 10, dropout=0.3)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    ps = [m.p for m in drop.modules() if isinstance(m, nn.Dropout)]
    assert ps and all(p == 0.3 for p in ps)
    # a checkpoint trained with dropout loads into the model built without it
    plain.load_state_dict(drop.state_dict())


def test_in_channels_override():
    model = create("resnet18", 7, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_resnet_imagenet_stem(name):
    model = create(name, 1000, stem="imagenet").eval()
    assert (model.conv1.kernel_size, model.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(model.pool, nn.AvgPool2d) and model.pool.kernel_size == 3 and model.pool.stride == 2
    assert sum(isinstance(m, ThresholdClip) for m in model.modules()) == ACTIVATION_COUNT[name]
    with torch.no_grad():
        assert model(example_input(name, 1, "imagenet")).shape == (1, 1000)
    cifar = create(name, 10)
    assert (cifar.conv1.kernel_size, cifar.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(cifar.pool, nn.Identity)


def test_vgg16_imagenet_variant():
    model = create("vgg16", 1000, stem="imagenet").eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512 * 7 * 7, 4096), (4096, 4096), (4096, 1000)]
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    with torch.no_grad():
        assert model(example_input("vgg16", 1, "imagenet")).shape == (1, 1000)
    gm = trace(model)
    calls = [n.target for n in gm.graph.nodes if isinstance(modules_of(gm, n), ThresholdClip)]
    assert len(calls) == len(set(calls)) == 15


def test_vgg16_cifar_classifier_is_small():
    linears = [m for m in create("vgg16", 100).modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 100)]


def test_cnn_fmnist_macs():
    """The multiply-accumulate count stated in the cnn-fmnist docstring."""
    model = create("cnn-fmnist", 10)
    total = 0

    def count(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    model(torch.randn(1, 1, 28, 28))
    for h in hooks:
        h.remove()
    assert total == 6_047_488
    assert "6,047,488" in type(model).__doc__


# ---------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("name", MODELS)
def test_thresholds_get_gradients(name):
    torch.manual_seed(0)
    model = create(name, 10)
    loss = F.cross_entropy(model(example_input(name, 2)), torch.arange(2))
    loss.backward()
    for pname, p in model.named_parameters():
        if pname.endswith("threshold_raw"):
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname


def test_cnn_fmnist_training_reduces_loss():
    torch.manual_seed(0)
    model = create("cnn-fmnist", 10)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    lam0 = [m.threshold.clone() for m in model.modules() if isinstance(m, ThresholdClip)]
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    lam1 = [m.threshold for m in model.modules() if isinstance(m, ThresholdClip)]
    assert any(not torch.equal(a, b) for a, b in zip(lam0, lam1))


def test_vgg16_width_and_28px_stem():
    """width scales every convolution and hidden layer; the pad28 stem pads 28x28 to 32x32 (the fifth pool
    meets a 2x2 map, not 1x1), chosen automatically for 28-px data, and converts exactly (the padding is in
    the SNN's static prefix): a burst SNN at T = L steps equals its ANN."""
    torch.manual_seed(0)
    full = create("vgg16", 10, in_channels=1, stem="pad28")
    quarter = create("vgg16", 10, in_channels=1, stem="pad28", width=0.25)
    convs = [m.out_channels for m in quarter.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [max(1, round(c / 4)) for c in (m.out_channels for m in full.modules() if isinstance(m, nn.Conv2d))]
    assert quarter.classifier[0].out_features == 128
    assert input_size("vgg16", "pad28", 1) == (1, 28, 28)
    x = torch.randn(8, 1, 28, 28)
    quarter.eval()
    for m in quarter.modules():  # random BN statistics and thresholds that make the clips work
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, ThresholdClip):
            m.threshold.data.fill_(1.0)
    feats = quarter.features[0](x)
    assert feats.shape[-1] == 32 and torch.equal(feats[..., 2:30, 2:30], x)
    import eclsnn

    snn = eclsnn.convert(quarter.double(), neuron="burst")
    out = eclsnn.simulate(snn, x.double(), time_steps=4)[-1]
    torch.testing.assert_close(out, quarter(x.double()), rtol=1e-9, atol=1e-9)
