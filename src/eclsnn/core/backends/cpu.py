"""Fused CPU kernels for the hot paths: the neuron loops of the simulator (optionally fused with the
average pooling that follows a neuron layer) and the threshold clipping function's forward and backward.

Why: in eager PyTorch every line of a neuron update or of the clip is one pass over memory, and these
tensors are the largest of a network; the dense convolutions are already fast. The kernels in
``_kernels.c`` do each update in one pass with the state in L1 cache, and perform exactly the
floating-point operations of the reference functions in :mod:`eclsnn.core.functional` (same order, no
fused multiply-add, no fast-math), so they are bit-identical to them — ``tests/test_kernels.py``
checks this for every kernel, and the simulator's spike-for-spike test runs through them.

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``/``gcc``) into
a per-user cache (``$ECLSNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/eclsnn`` or ``~/.cache/eclsnn``) and
loaded with ctypes; :mod:`._library` does this, and uses only cache folders and libraries that the user
owns and no one else can write (a damaged library is rebuilt). Built with ``-fopenmp`` the kernels run on ``torch.get_num_threads()`` threads of
the OpenMP runtime torch itself has loaded (the same shared library, so the two never compete for
cores); without OpenMP they run on one thread. Nothing is downloaded. Without a compiler eclsnn warns once and uses the PyTorch
reference path (same results, slower). Which calls run here is decided by the backend choice and the
one dispatch rule of :mod:`eclsnn.core.backends` (``ECLSNN_KERNELS=off`` is the reference path,
``ECLSNN_KERNELS=on`` makes a failed build an error); CUDA tensors, other dtypes than float32/float64
and unusual memory layouts always take the reference path.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from pathlib import Path

import torch

from eclsnn.errors import BackendError
from eclsnn.core.backends import _library
from eclsnn.core.backends.selection import default_backend, env_backend, reference_only

__all__ = ["available", "built", "enabled", "reference_only", "openmp", "build_error", "is_dense", "neuron_run", "addable",
           "neuron_pool_run", "clip_forward", "clip_backward"]

_SOURCE = Path(__file__).with_name("_kernels.c")
_MIN_PER_THREAD = 1 << 15  # elements; smaller jobs run on the calling thread
_CLIP_CHUNK = 1 << 12  # elements per partial sum of the λ-gradient (fixed: results do not depend on threads)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False

_P = ctypes.c_void_p
_I = ctypes.c_int64
_D = ctypes.c_double
_N = ctypes.c_int
_SIGNATURES = {
    "if_run": [_P, _I, _P, _I, _P, _I, _P, _I, _I, _P, _I, _I, _P, _N],
    "dual_run": [_P, _I, _P, _I, _P, _I, _P, _P, _I, _I, _P, _I, _I, _D, _P, _N],
    "pool_run": [_P, _I, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I, _P, _I, _D, _N],
    "clip_fwd": [_P, _P, _I, _P, _I, _D, _N],
    "clip_fwd_pc": [_P, _P, _I, _P, _I, _I, _I, _D, _N],
    "clip_bwd": [_P, _P, _P, _P, _I, _I, _P, _I, _D, _N, _N],
    "clip_bwd_pc": [_P, _P, _P, _P, _I, _I, _P, _I, _I, _I, _D, _N, _N],
}
_SYMBOLS = ["eclsnn_openmp"] + [f"{name}_{sfx}" for name in _SIGNATURES for sfx in ("f32", "f64")]


def _load(warn: bool = True) -> ctypes.CDLL | None:
    global _lib, _error, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            loaded = _library.load(_SOURCE, _SYMBOLS)
            if loaded.notes:  # the library is there, but not (only) from the folders asked for: say why, once
                where = (f"they are now in {loaded.folder}" if loaded.folder is not None
                         else "built them in a private temporary folder (again on every run)")
                rule = (" eclsnn loads kernels only from folders and files that you own, that no one else can write "
                        "and that are not symbolic links." if loaded.distrusted else "")
                warnings.warn(f"eclsnn: fused CPU kernels: {'; '.join(loaded.notes)}; {where}.{rule}", RuntimeWarning,
                              stacklevel=3)
            lib = loaded.lib
            lib.eclsnn_openmp.argtypes, lib.eclsnn_openmp.restype = [], ctypes.c_int
            for name, argtypes in _SIGNATURES.items():
                for suffix in ("f32", "f64"):
                    fn = getattr(lib, f"{name}_{suffix}")
                    fn.argtypes, fn.restype = argtypes, None
            _lib = lib
        except Exception as exc:  # any build or load failure: fall back to the reference path
            _error = str(exc)
            if env_backend() == "fused-cpu":
                _tried = True
                raise BackendError(f"eclsnn: ECLSNN_KERNELS=on but the fused CPU kernels could not be built: {_error}") from None
            if warn:
                warnings.warn(f"eclsnn: fused CPU kernels unavailable ({_error}); using the PyTorch reference path "
                              "(identical results, slower). Set ECLSNN_KERNELS=off to silence this.", RuntimeWarning,
                              stacklevel=3)
        _tried = True
    return _lib


def enabled() -> bool:
    """True unless the default backend is the reference (``ECLSNN_KERNELS=off``, or inside
    :func:`reference_only`)."""
    return default_backend() != "reference"


def built(warn: bool = True) -> bool:
    """True if the fused kernels are built (builds them on the first call; a failure warns once)."""
    return _load(warn) is not None


def available() -> bool:
    """True if the fused kernels are enabled and built (builds them on the first call)."""
    return enabled() and built()


def build_error() -> str | None:
    """Why the kernels could not be built, or None."""
    return _error


def _threads(n: int) -> int:
    """Threads for a job of n elements: torch's setting, one for small jobs."""
    return 1 if n < _MIN_PER_THREAD else max(1, torch.get_num_threads())


def openmp() -> bool:
    """True if the built kernels run multi-threaded (compiled with OpenMP)."""
    lib = _load()
    return bool(lib is not None and lib.eclsnn_openmp())


def _suffix(t: torch.Tensor) -> str:
    return "f32" if t.dtype == torch.float32 else "f64"


# ---- layout --------------------------------------------------------------------------------------

def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (every element once, no gaps), in any dimension order."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _channels(t: torch.Tensor) -> tuple[int, int]:
    """(C, inner) of a dense ``[B, C, ...]`` tensor: the channel of flat element i is (i // inner) % C."""
    if t.dim() < 2:
        return 1, 1
    if t.is_contiguous():
        inner = 1
        for s in t.shape[2:]:
            inner *= s
        return t.shape[1], inner
    return t.shape[1], 1  # channels-last: channel is the fastest dimension


def _theta_arg(theta: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    th = theta.detach().to(dtype).reshape(-1).contiguous()
    return th, th.numel()


# ---- neurons -------------------------------------------------------------------------------------

def neuron_run(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, count: torch.Tensor | None,
               neg_units: float | None, addend: torch.Tensor | None = None,
               v_start: torch.Tensor | None = None) -> torch.Tensor:
    """Run T steps of the IF (``count`` None) or dual-threshold neuron over ``x_seq`` ``[T, ...]``.

    ``v`` (and ``count``) are the state, dense with the layout of one step of ``x_seq``, updated in
    place. ``theta`` is a scalar or ``[C]`` tensor; ``neg_units`` is θ_neg in units of θ. Returns the
    outputs θ·s ``[T, ...]`` with the per-step layout of ``x_seq[0]``.

    ``addend`` ``[T, ...]`` (steps laid out like those of ``x_seq``, see :func:`addable`): the input
    current is ``x_seq + addend``, added in the kernel (a residual addition before the neuron, without
    its sum in memory). ``v_start`` (θ's shape): start afresh from ``v = v_start`` and ``count = 0``;
    ``v`` and ``count`` are then only written (they may be uninitialised).
    """
    lib = _load()
    y = x_seq[0]
    T, n = x_seq.shape[0], y.numel()
    xs = x_seq.stride(0) if T > 1 else n
    out = torch.empty_strided((T, *y.shape), (n, *y.stride()), dtype=y.dtype)
    C, inner = _channels(y)
    th, nth = _theta_arg(theta, y.dtype)
    if nth == 1:
        C = 1
    a_ptr, a_stride = None, 0
    if addend is not None:
        a_ptr, a_stride = addend.data_ptr(), addend.stride(0) if T > 1 else n
    v0 = None
    if v_start is not None:
        v0, n0 = _theta_arg(v_start, y.dtype)
        if n0 != nth:
            raise ValueError(f"v_start has {n0} values where theta has {nth}")
    v0p = None if v0 is None else v0.data_ptr()
    sfx = _suffix(y)
    xp, op, vp, tp = y.data_ptr(), out.data_ptr(), v.data_ptr(), th.data_ptr()
    nt = _threads(n * T)
    if count is None:
        getattr(lib, f"if_run_{sfx}")(xp, xs, a_ptr, a_stride, op, n, vp, T, n, tp, C, inner, v0p, nt)
    else:
        getattr(lib, f"dual_run_{sfx}")(xp, xs, a_ptr, a_stride, op, n, vp, count.data_ptr(), T, n, tp, C, inner,
                                        float(neg_units), v0p, nt)
    return out


def addable(x_seq: torch.Tensor, addend: torch.Tensor) -> bool:
    """Whether :func:`neuron_run` can take ``addend`` with ``x_seq``: the same shape and dtype, on the
    CPU, and each step laid out like those of ``x_seq`` (same strides; a step stride of 0 is a current
    that is the same every step)."""
    return (addend.shape == x_seq.shape and addend.dtype == x_seq.dtype and addend.device.type == "cpu"
            and addend[0].stride() == x_seq[0].stride())


def pool_fusable(y: torch.Tensor, k: int) -> bool:
    """Whether a neuron layer with step input like ``y`` can be fused with k×k/stride-k average pooling."""
    return (y.dim() == 4 and k >= 1 and y.shape[2] % k == 0 and y.shape[3] % k == 0
            and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous())


def neuron_pool_run(x_seq: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, count: torch.Tensor | None,
                    neg_units: float | None, k: int) -> torch.Tensor:
    """A neuron layer followed by ``avg_pool2d(kernel_size=k, stride=k)``, fused: returns the pooled
    outputs ``[T, B, C, H/k, W/k]`` (channels-last per step) without materialising the spike maps.
    The input steps must be channels-last ``[B, C, H, W]`` with H and W divisible by k."""
    lib = _load()
    y = x_seq[0]
    T = x_seq.shape[0]
    B, C, H, W = y.shape
    Ho, Wo = H // k, W // k
    n, n_out = y.numel(), B * C * Ho * Wo
    xs = x_seq.stride(0) if T > 1 else n
    out = torch.empty_strided((T, B, C, Ho, Wo), (n_out, Ho * Wo * C, 1, Wo * C, C), dtype=y.dtype)
    th, nth = _theta_arg(theta, y.dtype)
    cp = None if count is None else count.data_ptr()
    getattr(lib, f"pool_run_{_suffix(y)}")(y.data_ptr(), xs, out.data_ptr(), n_out, v.data_ptr(), cp, T, B, H, W, C,
                                           k, th.data_ptr(), nth, float(neg_units or 0.0), _threads(n * T))
    return out


# ---- threshold clipping function -----------------------------------------------------------------

def clip_forward(z: torch.Tensor, lam: torch.Tensor, levels: int | None, shift: float) -> torch.Tensor:
    """``h = λ·clamp(floor(z·L/λ + ψ)/L, 0, 1)`` of a dense CPU tensor; λ scalar or per-channel (dim 1)."""
    lib = _load()
    h = torch.empty_like(z)
    th, nth = _theta_arg(lam, z.dtype)
    n, sfx, L = z.numel(), _suffix(z), int(levels or 0)
    if nth == 1:
        getattr(lib, f"clip_fwd_{sfx}")(z.data_ptr(), h.data_ptr(), n, th.data_ptr(), L, float(shift), _threads(n))
    else:
        C, inner = _channels(z)
        getattr(lib, f"clip_fwd_pc_{sfx}")(z.data_ptr(), h.data_ptr(), n, th.data_ptr(), C, inner, L, float(shift),
                                           _threads(n))
    return h


def clip_backward(grad: torch.Tensor, z: torch.Tensor, lam: torch.Tensor, levels: int | None, shift: float,
                  want_z: bool, want_lam: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dL/dz, dL/dλ) of :func:`clip_forward` with the straight-through gradient of
    :class:`eclsnn.core.functional._ThresholdClipFn`; ``grad`` must have the layout of ``z``. dL/dλ is
    ``[C]`` (or a 0-dim tensor) in float64, summed in a fixed order that does not depend on the threads."""
    lib = _load()
    n, sfx, L = z.numel(), _suffix(z), int(levels or 0)
    th, nth = _theta_arg(lam, z.dtype)
    gz = torch.empty_like(z) if want_z else None
    gp, zp, op, lp = grad.data_ptr(), z.data_ptr(), gz.data_ptr() if gz is not None else None, th.data_ptr()
    if nth == 1:
        units, C = -(-n // _CLIP_CHUNK), 1
        partial = torch.zeros(units if want_lam else 1, dtype=torch.float64)
        getattr(lib, f"clip_bwd_{sfx}")(gp, zp, op, partial.data_ptr(), n, _CLIP_CHUNK, lp, L, float(shift),
                                        int(want_lam), _threads(n))
    else:
        C, inner = _channels(z)
        rows_per_unit = max(1, _CLIP_CHUNK // C)
        units = -(-(n // C) // rows_per_unit) if inner == 1 else n // (C * inner)
        partial = torch.zeros(units * C if want_lam else 1, dtype=torch.float64)
        getattr(lib, f"clip_bwd_pc_{sfx}")(gp, zp, op, partial.data_ptr(), n, rows_per_unit, lp, C, inner, L,
                                           float(shift), int(want_lam), _threads(n))
    glam = None
    if want_lam:
        glam = partial.view(units, C).sum(0)
        glam = glam.reshape(()) if nth == 1 else glam
    return gz, glam
