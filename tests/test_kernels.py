"""The fused CPU kernels (eclsnn.core.backends.cpu) against the PyTorch reference functions: bit-identical
neuron dynamics, pooling and clip forward/gradient; the λ-gradient within the rounding error of its sum
(far below the gradient) and independent of the thread count; the fallback when no compiler is available;
and the simulator's fast path (kernels, neuron+pool fusion, sub-batching) spike for spike against a plain
single-step loop. Each comparison counts the calls into the compiled library, so the fast side really ran
the kernels."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import eclsnn
from eclsnn import ThresholdClip
from eclsnn.core.backends import cpu as kernels
from eclsnn.simulation.executor import fused_neuron_pool
from eclsnn.core import functional as SF
from eclsnn.core.neurons import DualThresholdIFNeuron, IFNeuron


def test_kernels_build_here():
    # The test suite needs a C compiler (the Makefile's machines have gcc): the fast path must really be
    # what the other tests exercise.
    assert kernels.available(), kernels.build_error()
    if sys.platform.startswith("linux"):  # gcc has OpenMP; Apple's clang does not (the kernels then run serially)
        assert kernels.openmp()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into the compiled library, by entry point (``"if_run"``, ``"clip_bwd_pc"``, ...,
    both dtypes together): every ctypes function the Python side calls is wrapped for the test. A
    comparison of the fast path with the reference means nothing unless these counts moved."""
    from collections import Counter

    lib = kernels._load()
    assert lib is not None, kernels.build_error()
    calls = Counter()
    for name in kernels._SIGNATURES:
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"{name}_{suffix}")

            def counted(*args, _fn=fn, _name=name):
                calls[_name] += 1
                return _fn(*args)

            monkeypatch.setattr(lib, f"{name}_{suffix}", counted)
    return calls


def _seq(T, shape, dtype, layout, seed=0, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T * shape[0], *shape[1:], generator=g, dtype=dtype) * scale
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.view(T, *shape)


def _neuron(kind, theta, theta_neg=0.0, v_init=0.5):
    return DualThresholdIFNeuron(theta, v_init, theta_neg) if kind == "dual" else IFNeuron(theta, v_init)


def _reference(neuron, x_seq):
    with kernels.reference_only():
        out = neuron.multi_step(x_seq)
        return out, neuron.v.clone(), getattr(neuron, "count", None)


CASES = [  # (shape of one step, layout)
    ((4, 8, 6, 6), "contiguous"), ((4, 8, 6, 6), "channels_last"), ((16, 40), "contiguous"),
    ((3, 5, 7), "contiguous"), ((64, 32, 14, 14), "channels_last"),  # the last one runs multi-threaded
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("kind,theta_neg", [("if", 0.0), ("dual", 0.0), ("dual", -0.5), ("dual", -0.001)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_neuron_kernels_are_bit_identical_to_the_reference(dtype, shape, layout, kind, theta_neg, per_channel,
                                                           kernel_calls):
    T = 5
    x = _seq(T, shape, dtype, layout)
    theta = torch.rand(shape[1], generator=torch.Generator().manual_seed(1)) + 0.4 if per_channel else torch.tensor(0.9)
    n = _neuron(kind, theta, theta_neg)
    ref, ref_v, ref_c = _reference(n, x)
    assert sum(kernel_calls.values()) == 0  # the reference ran without the kernels
    out = n.multi_step(x)
    entry = "if_run" if kind == "if" else "dual_run"
    assert kernel_calls == {entry: 1}  # ... and the fast path through them
    assert torch.equal(out, ref) and torch.equal(n.v, ref_v)
    if kind == "dual":
        assert torch.equal(n.count, ref_c)
    assert (out != 0).any() and ((out < 0).any() or kind == "if")  # the case exercises spikes (and retractions)
    # the constant input of the first layer (stride 0 over time) reads one block for all steps
    const = x[0].unsqueeze(0).expand(T, *x.shape[1:])
    assert const.stride(0) == 0
    assert torch.equal(n.multi_step(const), _reference(n, const)[0])
    assert kernel_calls == {entry: 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", [((4, 8, 6, 6), "channels_last"), ((3, 5, 7), "contiguous"),
                                          ((64, 32, 14, 14), "channels_last")])
@pytest.mark.parametrize("kind", ["if", "dual"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_a_second_input_is_added_in_the_kernel_bit_identically(dtype, shape, layout, kind, per_channel, kernel_calls):
    """multi_step_sum(x, a) — the residual addition formed inside the neuron kernel — equals adding
    first and running the reference, for a time-varying and for a constant (stride-0) second input;
    and carrying the state on from there matches too."""
    T = 5
    x, a = _seq(T, shape, dtype, layout), _seq(T, shape, dtype, layout, seed=3)
    theta = torch.rand(shape[1], generator=torch.Generator().manual_seed(1)) + 0.4 if per_channel else torch.tensor(0.9)
    n = _neuron(kind, theta, -0.25, v_init=0.3)
    entry = "if_run" if kind == "if" else "dual_run"
    for addend in (a, a[1].unsqueeze(0).expand(T, *a.shape[1:])):
        ref, ref_v, ref_c = _reference(n, x + addend)
        out = n.multi_step_sum(x, addend)
        assert out is not None and torch.equal(out, ref) and torch.equal(n.v, ref_v)
        if kind == "dual":
            assert torch.equal(n.count, ref_c)
        assert (out != 0).any()
        with kernels.reference_only():  # continue from here: the reference carries its own copy of the state
            ref_n = _neuron(kind, theta, -0.25, v_init=0.3)
            ref_n.load_state({k: v.clone() for k, v in n.state().items()})
            ref2 = ref_n.multi_step(x + addend, carry=True)
        assert torch.equal(n.multi_step_sum(x, addend, carry=True), ref2) and torch.equal(n.v, ref_n.v)
    assert kernel_calls == {entry: 4}


def test_a_second_input_the_kernel_cannot_take_is_declined():
    x = _seq(3, (2, 4, 5, 5), torch.float32, "channels_last")
    n = _neuron("dual", 1.0)
    assert n.multi_step_sum(x, x[:, :, :1]) is None  # broadcast: the caller adds
    assert n.multi_step_sum(x, x.double()) is None  # dtype
    assert n.multi_step_sum(x, x.contiguous()) is None  # another layout per step
    assert n.multi_step_sum(x, x) is not None
    from eclsnn.core.neurons import BurstNeuron

    assert BurstNeuron(1.0).multi_step_sum(x, x) is None  # no kernel for the burst neuron


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["if", "dual"])
@pytest.mark.parametrize("shape", [(4, 8, 6, 6), (64, 32, 28, 28)])
@pytest.mark.parametrize("k", [2, 3])
def test_fused_neuron_and_average_pooling_equal_neuron_then_pool(dtype, kind, shape, k):
    if shape[2] % k:
        shape = (shape[0], shape[1], 6 * k, 6 * k)
    T = 4
    x = _seq(T, shape, dtype, "channels_last")
    n = _neuron(kind, torch.rand(shape[1], generator=torch.Generator().manual_seed(2)) + 0.5)
    ref, ref_v, _ = _reference(n, x)
    pooled_ref = F.avg_pool2d(ref.flatten(0, 1), k).view(T, shape[0], shape[1], shape[2] // k, shape[3] // k)
    pooled = fused_neuron_pool(n, x, k)
    assert pooled is not None
    assert torch.equal(pooled, pooled_ref)
    assert torch.equal(n.v, ref_v)
    const = x[0].unsqueeze(0).expand(T, *x.shape[1:])
    ref_c = F.avg_pool2d(_reference(n, const)[0].flatten(0, 1), k)
    assert torch.equal(fused_neuron_pool(n, const, k).flatten(0, 1), ref_c)


def test_fused_pooling_declines_what_it_cannot_do_exactly():
    n = IFNeuron(1.0)
    assert fused_neuron_pool(n, _seq(2, (2, 4, 6, 6), torch.float32, "contiguous"), 2) is None  # not channels-last
    assert fused_neuron_pool(n, _seq(2, (2, 4, 7, 7), torch.float32, "channels_last"), 2) is None  # 7 % 2
    assert fused_neuron_pool(n, _seq(2, (2, 4, 6, 6), torch.float16, "channels_last"), 2) is None  # dtype


@pytest.mark.parametrize("kind", ["if", "dual"])
def test_single_step_kernel_path_matches_the_reference_steps(kind, kernel_calls):
    x = _seq(6, (8, 4, 5, 5), torch.float32, "channels_last")
    fast, ref = _neuron(kind, 0.8), _neuron(kind, 0.8)
    for t in range(6):
        a = fast.single_step(x[t])
        with kernels.reference_only():
            b = ref.single_step(x[t])
        assert torch.equal(a, b) and torch.equal(fast.v, ref.v)
    assert kernel_calls == {"if_run" if kind == "if" else "dual_run": 6}  # one kernel call per fast step
    # a batch that shrinks (adaptive inference drops finished samples) keeps working
    keep = torch.tensor([True, False] * 4)
    fast.v = fast.v[keep]
    ref.v = ref.v[keep]
    if kind == "dual":
        fast.count, ref.count = fast.count[keep], ref.count[keep]
    a = fast.single_step(x[0][keep])
    with kernels.reference_only():
        b = ref.single_step(x[0][keep])
    assert torch.equal(a, b)


@given(st.integers(1, 8), st.integers(1, 300), st.integers(-8, 8), st.sampled_from(["if", "dual"]))
def test_neuron_kernels_property_dyadic_inputs(T, n, k, kind):
    """Exact dyadic values (ties included) in arbitrary sizes: kernel == reference."""
    g = torch.Generator().manual_seed(n * 31 + T)
    theta = torch.tensor(2.0 ** k)
    x = torch.randint(-12, 13, (T, 1, n), generator=g).float() * theta / 4
    neuron = _neuron(kind, theta)
    assert torch.equal(neuron.multi_step(x), _reference(neuron, x)[0])


# ---- threshold clipping function --------------------------------------------------------------------

def _clip_both(z, lam, levels, grad, calls):
    """(reference, kernel) results of forward and backward; ``calls`` (the kernel_calls fixture)
    must show no kernel call for the first and one forward and one backward call for the second."""
    results = []
    suffix = "_pc" if lam.numel() > 1 else ""
    for reference in (True, False):
        zz, ll = z.clone().requires_grad_(True), lam.clone().requires_grad_(True)
        before = dict(calls)
        if reference:
            with kernels.reference_only():
                h = SF.threshold_clip(zz, ll, levels)
        else:
            h = SF.threshold_clip(zz, ll, levels)
        h.backward(grad)
        made = {k: v - before.get(k, 0) for k, v in calls.items() if v != before.get(k, 0)}
        assert made == ({} if reference else {f"clip_fwd{suffix}": 1, f"clip_bwd{suffix}": 1}), made
        results.append((h.detach(), zz.grad, ll.grad))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", [((16, 8, 10, 10), "contiguous"), ((16, 8, 10, 10), "channels_last"),
                                          ((300, 40), "contiguous"), ((64, 32, 28, 28), "channels_last")])
@pytest.mark.parametrize("levels", [None, 1, 2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_clip_kernel_forward_and_gradients_match_the_reference(dtype, shape, layout, levels, per_channel,
                                                               kernel_calls):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(shape, generator=g, dtype=dtype) * 2
    # an upstream gradient of mean 1 (both signs): dL/dλ is then a sizeable fraction of Σ|terms|, so
    # a tolerance from the rounding error of the sum is far below the gradient (with mean 0 the sum
    # of ~10^6 terms cancels down to ~10^-5 of Σ|terms|, which float32 sums cannot resolve)
    grad = torch.randn(shape, generator=g, dtype=dtype) + 1
    if layout == "channels_last":
        z, grad = z.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    lam = (torch.rand(C, generator=g) + 0.5).view(C, *([1] * (len(shape) - 2))) if per_channel else torch.tensor(1.3)
    (h_ref, gz_ref, gl_ref), (h, gz, gl) = _clip_both(z, lam, levels, grad, kernel_calls)
    assert torch.equal(h, h_ref)  # bit-identical forward
    assert torch.equal(gz, gz_ref)  # bit-identical input gradient
    # λ-gradient: a sum in another order; both against the float64 sum of float64 terms
    with kernels.reference_only():
        lam64 = lam.double().requires_grad_(True)
        SF.threshold_clip(z.double(), lam64, levels).backward(grad.double())
        # the terms g_i·dh_i/dλ themselves: the same function with one λ per element (all equal)
        lam_el = lam.double().expand(shape).clone().requires_grad_(True)
        SF.threshold_clip(z.double(), lam_el, levels).backward(grad.double())
    terms = lam_el.grad
    torch.testing.assert_close(terms.sum_to_size(lam.shape), lam64.grad, rtol=1e-12, atol=0)
    # The error of a sum of n terms in precision u: ≤ 7·√n·u·Σ|terms| (probabilistic bound of Higham and
    # Mary, 2019, SIAM J. Sci. Comput. 41(5), for any order of summation; it fails with probability
    # < 2n·exp(-49/2) < 1e-4) -- plus a few roundings per term in evaluating dh/dλ = (h - c)/λ + [z ≥ λ]
    # and the product (≤ 4u·|g_i|, as dh/dλ is at most 1), plus the final rounding of the gradient to
    # float32, the dtype of λ, in either dtype of z.
    u = torch.finfo(dtype).eps / 2
    n = z.numel() // lam.numel()
    abs_sum = terms.abs().sum_to_size(lam.shape)
    g_abs = grad.double().abs().sum_to_size(lam.shape)
    tol = 7 * n ** 0.5 * u * abs_sum + 4 * u * g_abs + 2 ** -24 * lam64.grad.abs()
    assert (lam64.grad.abs() > 100 * tol).all(), "the tolerance must be far below the gradient it checks"
    assert ((gl.double() - lam64.grad).abs() <= tol).all(), (gl.double() - lam64.grad).abs().max()
    assert ((gl_ref.double() - lam64.grad).abs() <= tol).all(), (gl_ref.double() - lam64.grad).abs().max()


@pytest.mark.parametrize("per_channel,layout", [(False, "channels_last"), (True, "channels_last"), (True, "contiguous")])
def test_clip_kernel_gradient_is_independent_of_the_thread_count(per_channel, layout):
    z = torch.randn(64, 32, 28, 28) * 2
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(z)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            lam = (torch.rand(32, generator=torch.Generator().manual_seed(0)) + 0.5).view(32, 1, 1) if per_channel \
                else torch.tensor(1.1)
            lam.requires_grad_(True)
            SF.threshold_clip(z, lam, 4).backward(grad)
            grads.append(lam.grad.clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_clip_kernel_in_no_grad_mode_and_under_autocast():
    clip = ThresholdClip(4, 1.5)
    z = torch.randn(8, 3, 5, 5)
    with torch.no_grad():
        fast = clip(z)
        with kernels.reference_only():
            ref = clip(z)
    assert torch.equal(fast, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = clip(z.bfloat16())
    assert out.dtype == torch.float32  # SPEC: computed in fp32 even under autocast
    with kernels.reference_only():
        assert torch.equal(out, clip(z.bfloat16().float()))


# ---- the simulator's fast path ------------------------------------------------------------------------

class PoolNet(nn.Module):
    """conv-BN-clip-avgpool, a residual block, adaptive pool and a readout: every fused path."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), ThresholdClip(4, 1.0)
        self.p1 = nn.AvgPool2d(2)
        self.c2, self.b2, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), ThresholdClip(4, 1.2)
        self.c3, self.a3 = nn.Conv2d(8, 8, 3, padding=1), ThresholdClip(4, 0.9)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.p1(self.a1(self.b1(self.c1(x))))
        y = self.a2(self.b2(self.c2(x)))
        y = self.a3(self.c3(y) + x)  # residual add before the neuron
        return self.fc(torch.flatten(self.gap(y), 1))


def _trained_like(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _record(snn, method: str) -> dict:
    """Wrap every neuron's step method (an instance attribute) to keep a copy of each output."""
    store = {}
    for name, mod in snn.neurons():
        def wrapped(inp, _orig=getattr(mod, method), _name=name):
            o = _orig(inp)
            store.setdefault(_name, []).append(o.clone())
            return o
        setattr(mod, method, wrapped)
    return store


def _expected_calls(snn, sub_batches: int, neuron: str, fused: bool = True) -> dict:
    """Kernel calls of one :meth:`SpikingNetwork.run`: per sub-batch, one fused neuron+pool call per
    planned fusion and one neuron call per other neuron layer."""
    n_fused = len(snn.plan().fusions) if fused else 0
    calls = {"pool_run": n_fused * sub_batches} if n_fused else {}
    return calls | {"if_run" if neuron == "if" else "dual_run": (len(snn.neurons()) - n_fused) * sub_batches}


@torch.no_grad()
@pytest.mark.parametrize("neuron", ["if", "dual"])
def test_fast_simulation_is_spike_for_spike_equal_to_a_plain_single_step_loop(neuron, kernel_calls):
    """float64 (where every layer's arithmetic is deterministic): the fused, sub-batched multi-step run
    gives the same readout at every step, and every neuron the same spike train, as the reference
    single-step loop on the PyTorch path."""
    model = _trained_like(PoolNet()).double()
    x = torch.randn(24, 2, 12, 12, dtype=torch.float64) * 2
    T = 8
    snn = eclsnn.convert(model, neuron=neuron)
    snn.max_rows = 40  # several sub-batches of 5 samples
    fast = snn.run(x, T)
    # the fast run went through the kernels: 5 sub-batches, each one fused call (neuron a1 + pool p1)
    # and one call for each of the two other neuron layers
    expected = _expected_calls(snn, 5, neuron)
    assert expected["pool_run"] == 5 and kernel_calls == expected
    with kernels.reference_only():
        snn.set_step_mode("single")
        spikes_ref = _record(snn, "single_step")
        ref = torch.stack([snn(x) for _ in range(T)])
        for _, mod in snn.neurons():
            del mod.single_step
        snn.set_step_mode("multi")
    assert kernel_calls == expected  # (none from the reference loop)
    assert torch.equal(fast, ref)
    # the spike trains of the (unfused) kernel path, recorded by an observer
    spikes = {}
    snn.add_observer(lambda name, node, inp, out: spikes.setdefault(name, []).append(out.clone()))
    snn.max_rows = None
    assert torch.equal(snn.run(x, T), ref)
    unfused = _expected_calls(snn, 1, neuron, fused=False)
    assert kernel_calls == {k: expected.get(k, 0) + unfused.get(k, 0) for k in expected | unfused}
    for name in spikes_ref:
        assert torch.equal(spikes[name][0], torch.stack(spikes_ref[name]))
    total = sum(int((torch.stack(v) != 0).sum()) for v in spikes_ref.values())
    assert total > 1000


@torch.no_grad()
def test_fusion_and_sub_batching_change_nothing_in_float32(kernel_calls):
    model = _trained_like(PoolNet())
    x = torch.randn(32, 2, 12, 12) * 2
    snn = eclsnn.convert(model, neuron="dual")
    snn.max_rows = 64
    fast = snn.run(x, 6)
    assert kernel_calls == _expected_calls(snn, 4, "dual") == {"pool_run": 4, "dual_run": 8}  # 4 sub-batches of 10
    snn.fuse_pooling = False
    kernel_calls.clear()
    unfused = snn.run(x, 6)
    assert kernel_calls == _expected_calls(snn, 4, "dual", fused=False) == {"dual_run": 12}
    kernel_calls.clear()
    with kernels.reference_only():
        ref = snn.run(x, 6)
    assert not kernel_calls
    assert torch.equal(fast, unfused) and torch.equal(fast, ref)


class AddNet(nn.Module):
    """Three kinds of addition before a neuron: a residual sum nothing else uses (formed in the kernel),
    a sum also used elsewhere (stored), and one with a broadcast operand (stored: the kernel declines)."""

    def __init__(self):
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(2, 6, 3, padding=1), ThresholdClip(4, 1.0)
        self.c2, self.a2 = nn.Conv2d(6, 6, 3, padding=1), ThresholdClip(4, 1.1)
        self.c3, self.a3 = nn.Conv2d(6, 6, 3, padding=1), ThresholdClip(4, 0.9)
        self.c4, self.a4 = nn.Conv2d(6, 6, 1), ThresholdClip(4, 1.3)
        self.register_buffer("shift", torch.linspace(-0.3, 0.3, 6).view(6, 1, 1))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.a1(self.c1(x))
        y = self.a2(self.c2(x) + x)  # residual: fused
        s = self.c3(y) + y
        z = self.a3(s) + self.c4(s)  # the sum has two users: stored
        z = self.a4(z + self.shift)  # broadcast operand: stored
        return self.fc(z.mean((2, 3)))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_additions_are_formed_in_the_neuron_kernel_spike_for_spike(dtype, monkeypatch):
    torch.manual_seed(0)
    model = AddNet().eval().to(dtype)
    x = torch.randn(12, 2, 8, 8, dtype=dtype) * 2
    snn = eclsnn.convert(model, neuron="dual")
    additions = snn.plan().additions
    assert [str(n.target) for n in additions] == ["a2", "a4"]  # planned; a4's broadcast sum is declined at run time
    seen = []
    real = kernels.neuron_run

    def spy(*args, **kwargs):
        seen.append(kwargs.get("addend") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "neuron_run", spy)
    snn.max_rows = 3 * 6  # 4 sub-batches of 3 samples
    fast = snn.run(x, 6)
    assert seen.count(True) == 4 and seen.count(False) == 3 * 4  # a2 took the sum's operands; a1, a3, a4 did not
    with kernels.reference_only():
        ref = snn.run(x, 6)
    assert torch.equal(fast, ref)
    # an observer sees every neuron's input, so nothing is fused while one is registered
    inputs = {}
    snn.add_observer(lambda name, node, inp, out: inputs.setdefault(name, inp.clone()))
    seen.clear()
    assert torch.equal(snn.run(x, 6), ref) and not any(seen)
    assert set(inputs) == {"a1", "a2", "a3", "a4"}


class StaticFirstNet(nn.Module):
    """A residual sum whose first operand is computed before the first neuron (static over time)."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(2, 6, 3, padding=1)
        self.c1, self.a1 = nn.Conv2d(2, 6, 3, padding=1), ThresholdClip(4, 1.0)
        self.c2, self.a2 = nn.Conv2d(6, 6, 3, padding=1), ThresholdClip(4, 0.8)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.a2(self.c0(x) + self.c2(self.a1(self.c1(x))))
        return self.fc(y.mean((2, 3)))


@torch.no_grad()
def test_a_residual_sum_with_a_static_first_operand_matches_the_unfused_path_bit_for_bit():
    torch.manual_seed(1)
    snn = eclsnn.convert(StaticFirstNet().eval(), neuron="dual")
    x = torch.randn(8, 2, 8, 8) * 2
    fused = snn.run(x, 5)
    snn.fuse_additions = False
    assert torch.equal(fused, snn.run(x, 5))
    with kernels.reference_only():
        assert torch.equal(fused, snn.run(x, 5))


def test_carrying_the_state_into_another_dtype_converts_it():
    x = _seq(3, (2, 4, 5, 5), torch.float32, "channels_last")
    fast, ref = _neuron("dual", 0.9), _neuron("dual", 0.9)
    fast.multi_step(x)
    with kernels.reference_only():
        ref.multi_step(x)
        expected = ref.multi_step(x.double(), carry=True)
    assert torch.equal(fast.multi_step(x.double(), carry=True), expected)
    assert torch.allclose(fast.v, ref.v.to(fast.v.dtype), atol=1e-6)  # (no garbage from a float32 buffer)


def test_fusion_is_planned_for_plain_average_pooling_only():
    model = _trained_like(PoolNet())
    snn = eclsnn.convert(model)
    fusions = snn.plan().fusions
    assert [k for _, k in fusions.values()] == [2]  # the 2×2 average pool, not the adaptive pool


# ---- fallback when no compiler is available ------------------------------------------------------------

def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
                          timeout=300)


def test_without_a_compiler_eclsnn_warns_once_and_uses_the_reference_path(tmp_path):
    code = """
        import warnings, torch, eclsnn
        from eclsnn.core.backends import cpu as kernels
        from eclsnn.core.neurons import DualThresholdIFNeuron
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            n = DualThresholdIFNeuron(1.0)
            x = torch.randn(4, 3, 10)
            out = n.multi_step(x)
            n.multi_step(x)
        assert not kernels.available()
        assert sum("kernels unavailable" in str(m.message) for m in w) == 1, [str(m.message) for m in w]
        with kernels.reference_only():
            assert torch.equal(out, n.multi_step(x))
        print("fallback ok")
    """
    env = {"CC": str(tmp_path / "no-such-compiler"), "PATH": str(tmp_path), "ECLSNN_CACHE_DIR": str(tmp_path / "cache"),
           "TMPDIR": str(tmp_path)}
    proc = _run_python(code, env)
    assert proc.returncode == 0, proc.stderr
    assert "fallback ok" in proc.stdout


def test_kernels_on_makes_a_failed_build_an_error(tmp_path):
    code = """
        import torch
        from eclsnn.core.neurons import IFNeuron
        IFNeuron(1.0).multi_step(torch.randn(2, 3, 4))
    """
    env = {"CC": str(tmp_path / "no-such-compiler"), "PATH": str(tmp_path), "ECLSNN_CACHE_DIR": str(tmp_path / "cache"),
           "TMPDIR": str(tmp_path), "ECLSNN_KERNELS": "on"}
    proc = _run_python(code, env)
    assert proc.returncode != 0
    assert "ECLSNN_KERNELS=on" in proc.stderr and "could not be built" in proc.stderr


def test_kernels_off_skips_the_build(tmp_path):
    code = """
        import torch
        from eclsnn.core.backends import cpu as kernels
        from eclsnn.core.neurons import IFNeuron
        IFNeuron(1.0).multi_step(torch.randn(2, 3, 4))
        assert not kernels.enabled() and not kernels._tried
        print("off ok")
    """
    proc = _run_python(code, {"ECLSNN_KERNELS": "off", "ECLSNN_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0 and "off ok" in proc.stdout, proc.stderr
    assert not (tmp_path / "cache").exists()


def test_a_corrupt_cached_library_is_rebuilt(tmp_path):
    code = """
        import torch
        from eclsnn.core.backends import cpu as kernels
        assert kernels.available(), kernels.build_error()
        print("built")
    """
    env = {"ECLSNN_CACHE_DIR": str(tmp_path)}
    assert "built" in _run_python(code, env).stdout
    libs = [p for p in tmp_path.glob("kernels-*") if not p.name.endswith(".sha256")]  # beside it: its digest
    assert len(libs) == 1
    libs[0].write_bytes(b"not a shared library")
    proc = _run_python(code, env)
    assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr
