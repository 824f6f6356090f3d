"""Pure functions of the method: the threshold clipping function and the neuron dynamics.

Everything here is stateless: state goes in and comes out as tensors, so each function can be
property-tested on its own. The modules in :mod:`eclsnn.core.clip` and :mod:`eclsnn.core.neurons` hold
parameters, buffers and configuration and call these functions.

Equations (docs/METHOD.md):

- threshold clipping  ``h(z) = λ · clamp(floor(z·L/λ + ψ)/L, 0, 1)``, ψ = 1/2
- IF neuron           ``m = v + I;  s = H(m − θ);  v = m − s·θ;  out = θ·s``
- dual-threshold IF   ``s = +1 if m ≥ θ;  −1 if m < θ_neg and c > 0;  0 otherwise``
"""

from __future__ import annotations

import torch

from eclsnn.core import backends
from eclsnn.core.backends import cpu as kernels
from eclsnn.errors import ConfigError

__all__ = [
    "LAMBDA_MIN",
    "threshold_clip",
    "if_step",
    "if_multistep",
    "dual_threshold_step",
    "dual_threshold_multistep",
    "burst_step",
    "burst_multistep",
]

#: Smallest threshold λ used in the forward pass; keeps λ positive while training (docs/METHOD.md, the
#: clip's "positivity of λ" row). The gradient still reaches the raw parameter, so a λ pushed below it can recover.
LAMBDA_MIN = 1e-3

#: The most quantisation levels L a clip may have: z·L/λ and its floor are exact in float32 only up to
#: 2^24, and the C kernels take L as a 64-bit integer (a larger value would wrap around).
MAX_LEVELS = 2**24


def check_levels(levels) -> int | None:
    """``levels`` as an int (None or 0: unquantised → None), or a ConfigError: a non-negative integer of at
    most :data:`MAX_LEVELS`."""
    if levels is None:
        return None
    if isinstance(levels, bool) or int(levels) != levels or levels < 0:
        raise ConfigError(f"levels must be a non-negative integer or None, got {levels!r}")
    if levels > MAX_LEVELS:
        raise ConfigError(f"levels = {levels} is more than the {MAX_LEVELS} (2^24) quantisation levels float32 can "
                          "resolve; use levels = None (or 0) for the unquantised clip")
    return int(levels) or None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The clip is computed in fp32 even under autocast (fp16 cannot hold floor(z·L/λ) ties).
    return torch.promote_types(dtype, torch.float32)


class _ThresholdClipFn(torch.autograd.Function):
    """Straight-through gradient keyed to the input z (docs/METHOD.md, the clip's "gradient" row).

    For 0 < z < λ: dh/dz = 1, dh/dλ = (h − z)/λ.  For z ≥ λ: dh/dz = 0, dh/dλ = 1.  For z ≤ 0: both 0.
    Keying the regions to z rather than to the output keeps λ trainable at L = 1, where the output
    already equals λ for z ≥ λ(1 − 1/2L).

    Written for few passes over memory (the clip sits on the largest tensors of a network): with
    c = clamp(z, 0, λ), the quantised output is ``h = floor(c·L/λ + ψ)·λ/L`` (no second clamp needed),
    and the per-element λ-gradient is ``(h − c)/λ + [z ≥ λ]`` — which is (h − z)/λ inside, 1 above and
    0 below — computed in the forward pass so that the backward pass is one masked copy and one
    reduction.
    """

    @staticmethod
    def forward(ctx, z, lam, levels, shift):  # type: ignore[override]
        dtype = _compute_dtype(z.dtype)
        z = z.to(dtype)
        lam_e = lam.to(dtype).clamp(min=LAMBDA_MIN)
        scalar = lam_e.dim() == 0
        c = z.clamp(0, lam_e.item()) if scalar and z.device.type == "cpu" else torch.minimum(z.clamp(min=0), lam_e)
        if levels:
            h = torch.floor(c * (levels / lam_e) + shift).mul_(lam_e / levels) if shift >= 0 else None
            if h is None:  # ψ < 0 could push floor below 0: clamp as the formula says
                h = torch.floor(c * (levels / lam_e) + shift).clamp_(0, levels).mul_(lam_e / levels)
        else:
            h = c
        if ctx.needs_input_grad[1]:
            dlam = (h - c).div_(lam_e).add_(z >= lam_e) if levels else (z >= lam_e).to(dtype)
        else:
            dlam = None
        ctx.save_for_backward(z, lam_e, dlam)
        ctx.lam_shape = lam.shape
        ctx.lam_dtype = lam.dtype
        return h

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, lam_e, dlam = ctx.saved_tensors
        grad_z = grad_lam = None
        if ctx.needs_input_grad[0]:
            if lam_e.dim() == 0 and z.device.type == "cpu":
                grad_z = torch.ops.aten.hardtanh_backward(grad, z, 0.0, lam_e.item())  # grad where 0 < z < λ
            else:
                grad_z = grad * ((z > 0) & (z < lam_e))
        if ctx.needs_input_grad[1]:
            if lam_e.dim() == 0:
                grad_lam = torch.dot(grad.reshape(-1), dlam.reshape(-1))
            else:
                grad_lam = (grad * dlam).sum_to_size(ctx.lam_shape)
            grad_lam = grad_lam.reshape(ctx.lam_shape).to(ctx.lam_dtype)
        return grad_z, grad_lam, None, None


class _ThresholdClipKernelFn(torch.autograd.Function):
    """:class:`_ThresholdClipFn` on the fused CPU kernels (:mod:`eclsnn.core.backends.cpu`): the same values and
    gradients, one pass over memory forward and one backward (ReLU's cost), recomputing the
    λ-gradient factor from z in the backward pass instead of storing it."""

    @staticmethod
    def forward(ctx, z, lam, levels, shift):  # type: ignore[override]
        lam_e = lam.detach().to(z.dtype).clamp(min=LAMBDA_MIN)
        ctx.save_for_backward(z, lam_e)
        ctx.levels, ctx.shift = levels, shift
        ctx.lam_shape, ctx.lam_dtype = lam.shape, lam.dtype
        return kernels.clip_forward(z, lam_e, levels, shift)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, lam_e = ctx.saved_tensors
        grad = _like_layout(grad, z)
        grad_z, grad_lam = kernels.clip_backward(grad, z, lam_e, ctx.levels, ctx.shift,
                                                 ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if grad_lam is not None:
            grad_lam = grad_lam.reshape(ctx.lam_shape).to(ctx.lam_dtype)
        return grad_z, grad_lam, None, None


def _like_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if t.stride() == ref.stride():
        return t
    if ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def threshold_clip(z: torch.Tensor, lam: torch.Tensor | float, levels: int | None = 4, shift: float = 0.5,
                   backend: str | None = None) -> torch.Tensor:
    """Learnable threshold clipping function (docs/METHOD.md; QCFS form with ψ = 1/2).

    ``h(z) = λ · clamp(floor(z·L/λ + shift)/L, 0, 1)``; with ``levels`` None or 0 the plain
    ``clamp(z, 0, λ)``. ``lam`` must broadcast against ``z`` (a scalar, or per-channel with shape
    ``[C, 1, 1]`` for images / ``[C]`` for features). λ is clamped to at least :data:`LAMBDA_MIN` in
    the forward pass. The result is computed in at least float32. ``backend`` as in
    :mod:`eclsnn.core.backends` (None: the default).
    """
    if not torch.is_tensor(lam):
        lam = torch.tensor(float(lam), device=z.device)
    levels = check_levels(levels)
    shift = float(shift)
    if lam.device == z.device and (levels is None or shift >= 0):
        zc = z.to(_compute_dtype(z.dtype))
        if backends.use_fused_cpu(backend, zc, lam):
            if torch.is_grad_enabled() and (zc.requires_grad or lam.requires_grad):
                return _ThresholdClipKernelFn.apply(zc, lam, levels, shift)
            return kernels.clip_forward(zc, lam.detach().to(zc.dtype).clamp(min=LAMBDA_MIN), levels, shift)
    return _ThresholdClipFn.apply(z, lam, levels, shift)


# --------------------------------------------------------------------------------------------------
# Neuron dynamics. ``theta`` broadcasts against one step's input; ``theta_neg`` is absolute (not in
# units of θ) here — the modules convert.


def if_step(x: torch.Tensor, v: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the IF neuron with reset by subtraction.

    ``m = v + x;  s = H(m − θ);  v' = m − s·θ``. Returns ``(θ·s, v')``.
    """
    m = v + x
    out = (m >= theta).to(m.dtype) * theta
    return out, m - out


def if_multistep(x_seq: torch.Tensor, theta: torch.Tensor, v0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`if_step` over the first dimension of ``x_seq`` (``[T, ...]``).

    Returns ``(out_seq, v_T)`` with ``out_seq`` of the shape of ``x_seq``. The same arithmetic as
    :func:`if_step` (so the results are identical), done in place: four passes over memory a step
    and no allocation.
    """
    out = torch.empty_like(x_seq)
    v = v0.clone()
    spike = torch.empty(v.shape, dtype=torch.bool, device=v.device)
    for t in range(x_seq.shape[0]):
        v.add_(x_seq[t])  # m = v + x
        torch.ge(v, theta, out=spike)
        o = out[t]
        torch.mul(spike, theta, out=o)  # θ·s
        v.sub_(o)  # v = m − θ·s
    return out, v


def dual_threshold_step(
    x: torch.Tensor, v: torch.Tensor, count: torch.Tensor, theta: torch.Tensor, theta_neg: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the dual-threshold (signed) IF neuron (docs/METHOD.md, "Dual-threshold neuron").

    ``m = v + x``; ``s = +1`` if ``m ≥ θ``, ``−1`` if ``m < θ_neg`` and the net count ``c > 0``
    (retract one earlier spike), else 0; ``v' = m − s·θ``; ``c' = c + s``. The count gate is the
    signed neuron "with memory" of SNM (Wang et al., IJCAI 2022). Returns ``(θ·s, v', c')``.
    """
    m = v + x
    s = (m >= theta).to(m.dtype) - ((m < theta_neg) & (count > 0)).to(m.dtype)
    out = s * theta
    return out, m - out, count + s


def dual_threshold_multistep(
    x_seq: torch.Tensor, theta: torch.Tensor, theta_neg: torch.Tensor | float, v0: torch.Tensor, count0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run :func:`dual_threshold_step` over the first dimension of ``x_seq``. Returns ``(out_seq, v_T, c_T)``.

    Identical arithmetic to :func:`dual_threshold_step` (θ·s is exactly ±θ or 0), done in place
    with preallocated masks.
    """
    out = torch.empty_like(x_seq)
    v = v0.clone()
    count = count0.clone()
    shape, dev = v.shape, v.device
    pos = torch.empty(shape, dtype=torch.bool, device=dev)
    neg = torch.empty(shape, dtype=torch.bool, device=dev)
    fired = torch.gt(count, 0)
    neg_theta = -theta if torch.is_tensor(theta) else torch.tensor(-theta)
    for t in range(x_seq.shape[0]):
        v.add_(x_seq[t])  # m = v + x
        torch.ge(v, theta, out=pos)
        torch.lt(v, theta_neg, out=neg)
        neg.logical_and_(fired)  # count gate: retract only an earlier spike
        o = out[t]
        torch.mul(pos, theta, out=o)
        torch.where(neg, neg_theta, o, out=o)  # θ·s with s ∈ {−1, 0, 1}
        v.sub_(o)
        count.add_(pos).add_(neg, alpha=-1)
        torch.gt(count, 0, out=fired)
    return out, v, count


def burst_step(
    x: torch.Tensor, v: torch.Tensor, count: torch.Tensor, steps: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the burst (graded-spike) dual-threshold neuron (docs/METHOD.md, "Burst neuron").

    ``m = v + x``; ``n = clamp(floor(m/θ), −c, t − c)`` with ``t`` the steps so far including this one
    and ``c`` the net count before it: as many positive spikes as whole thresholds the potential holds,
    as many negative ones as needed to bring it back to [0, θ) (never more than were fired), and never
    more than one spike per elapsed step in all (the rate stays ≤ θ); ``v' = m − n·θ``; ``c' = c + n``.
    Returns ``(θ·n, v', c', t)``.
    """
    m = v + x
    steps = steps + 1
    n = torch.floor(m / theta)
    r = m - n * theta  # the quotient may round across a whole number: settle it by comparison, as m ≥ θ does
    n = n + (r >= theta).to(m.dtype) - (r < 0).to(m.dtype)
    n = torch.minimum(torch.maximum(n, -count), steps - count)
    out = n * theta
    return out, m - out, count + n, steps


def burst_multistep(
    x_seq: torch.Tensor, theta: torch.Tensor, v0: torch.Tensor, count0: torch.Tensor, steps0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run :func:`burst_step` over the first dimension of ``x_seq``. Returns ``(out_seq, v_T, c_T, t_T)``."""
    out = torch.empty_like(x_seq)
    v, count, steps = v0, count0, steps0
    for t in range(x_seq.shape[0]):
        out[t], v, count, steps = burst_step(x_seq[t], v, count, steps, theta)
    return out, v, count, steps
