/* Fused CPU kernels of eclsnn: the IF / dual-threshold neuron loops (optionally fused with the
 * average pooling that follows them) and the threshold clipping function's forward and backward.
 *
 * Compiled on first use by eclsnn/kernels.py and called through ctypes. Every neuron and forward
 * kernel performs exactly the floating-point operations of the reference in eclsnn/functional.py, in
 * the same order (built with -ffp-contract=off and without -ffast-math), so its results are
 * bit-identical to it; tests/test_kernels.py checks this.
 *
 * Layout conventions:
 *   - A neuron layer's input is T steps of n elements each; step t starts at x + t*xs (xs = 0: the
 *     same current every step, the constant first-layer current). Outputs are written at out + t*os.
 *   - The channel of flat element i is (i / inner) % C: inner = H*W for NCHW, 1 for channels-last
 *     or [B, F] features. C = 1 means a scalar threshold.
 *   - Elements are processed in blocks of BLOCK that stay in L1 cache while all T steps run over
 *     them: one read of the input and one write of the output per step, the state never leaves cache.
 *
 * This file includes itself once per floating-point type (the part below #else is the body).
 */
#ifndef T_

#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 1024
#define LANES 16

/* Built with -fopenmp this uses the OpenMP runtime torch has already loaded (same soname), so the
 * kernels share torch's worker threads instead of competing with them; without it, serial. */
#ifdef _OPENMP
#define PARALLEL_FOR _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")
int eclsnn_openmp(void) { return 1; }
#else
#define PARALLEL_FOR
int eclsnn_openmp(void) { return 0; }
#endif

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUF)

#define T_ float
#define SUF f32
#define FLOOR floorf
#define ITYPE int32_t
#include __FILE__
#undef T_
#undef SUF
#undef FLOOR
#undef ITYPE

#define T_ double
#define SUF f64
#define FLOOR floor
#define ITYPE int64_t
#include __FILE__

#else  /* ---- body, once per type ---------------------------------------------------------------- */

static void FN(fill_theta)(T_ *th, const T_ *theta, int64_t C, int64_t inner, int64_t i0, int64_t len) {
    if (C == 1) {
        for (int64_t j = 0; j < len; j++) th[j] = theta[0];
        return;
    }
    /* the channel of element i0 + j is ((i0 + j) / inner) % C: stepped along, not divided per element */
    int64_t ch = (i0 / inner) % C, rem = i0 % inner;
    for (int64_t j = 0; j < len; j++) {
        th[j] = theta[ch];
        if (++rem == inner) {
            rem = 0;
            if (++ch == C) ch = 0;
        }
    }
}

/* One step of one neuron; returns the output θ·s and updates the state in place. */
static inline T_ FN(if_step)(T_ *v, T_ x, T_ th) {
    T_ m = *v + x;
    T_ o = m >= th ? th : (T_)0;
    *v = m - o;
    return o;
}

static inline T_ FN(dual_step)(T_ *v, T_ *c, T_ x, T_ th, T_ thn) {
    T_ m = *v + x;
    int pos = m >= th;
    int neg = (m < thn) & (*c > (T_)0);
    T_ o = pos ? th : (neg ? -th : (T_)0);
    *v = m - o;
    *c = *c + (T_)(pos - neg);
    return o;
}

/* The neuron kernels hold the state of 2·VW neurons in vector registers while all T steps run over
 * them (GCC/Clang vector extensions; without AVX the compiler splits each vector in two), so per step
 * only the input is read and the output written; the few neurons of a block's tail that do not fill the
 * vectors run element by element through if_step / dual_step. The vector step performs the scalar
 * step's operations exactly (comparisons become lane masks, the selects bitwise ands and ors of
 * exact values), so both give bit-identical results. */
typedef T_ FN(vec) __attribute__((vector_size(32)));
typedef ITYPE FN(ivec) __attribute__((vector_size(32)));
#define VW ((int64_t)(32 / sizeof(T_)))
#define VLOAD(dst, src) memcpy(&(dst), (src), sizeof(FN(vec)))
#define VSTORE(dst, src) memcpy((dst), &(src), sizeof(FN(vec)))
/* The input current of step t for the 2·VW neurons at b0 + j0: x[t] (+ x2[t], added first). */
#define VINPUT(xa, xb, t)                                                                             \
    do {                                                                                              \
        const T_ *xp_ = x + (t) * xs + b0 + j0;                                                       \
        VLOAD(xa, xp_); VLOAD(xb, xp_ + VW);                                                          \
        if (x2) {                                                                                     \
            const T_ *yp_ = x2 + (t) * x2s + b0 + j0;                                                 \
            V ya_, yb_;                                                                               \
            VLOAD(ya_, yp_); VLOAD(yb_, yp_ + VW);                                                    \
            xa = xa + ya_;                                                                            \
            xb = xb + yb_;                                                                            \
        }                                                                                             \
    } while (0)

/* IF neuron, reset by subtraction:  m = v + x;  o = θ if m >= θ else 0;  v = m − o.
 * x2 (or NULL): a second input current added to x first (the residual addition before the neuron),
 * x2s its step stride (0: the same every step). v0 (or NULL): a fresh start with v = v0 (one value per
 * channel, like θ) instead of continuing from v. */
void FN(if_run)(const T_ *x, int64_t xs, const T_ *x2, int64_t x2s, T_ *out, int64_t os, T_ *v, int64_t T,
                int64_t n, const T_ *theta, int64_t C, int64_t inner, const T_ *v0, int nthreads) {
    typedef FN(vec) V;
    typedef FN(ivec) IV;
    const int64_t nb = (n + BLOCK - 1) / BLOCK;
    PARALLEL_FOR
    for (int64_t bi = 0; bi < nb; bi++) {
        T_ th[BLOCK], vi[BLOCK];
        const int64_t b0 = bi * BLOCK, len = n - b0 < BLOCK ? n - b0 : BLOCK;
        FN(fill_theta)(th, theta, C, inner, b0, len);
        if (v0) FN(fill_theta)(vi, v0, C, inner, b0, len);
        const T_ *vsrc = v0 ? vi : v + b0;
        int64_t j0 = 0;
        for (; j0 + 2 * VW <= len; j0 += 2 * VW) {
            V t1, t2, va, vb;
            VLOAD(t1, th + j0); VLOAD(t2, th + j0 + VW);
            VLOAD(va, vsrc + j0); VLOAD(vb, vsrc + j0 + VW);
            for (int64_t t = 0; t < T; t++) {
                V xa, xb, oa, ob;
                VINPUT(xa, xb, t);
                xa = va + xa;  /* m */
                xb = vb + xb;
                oa = (V)((IV)t1 & (IV)(xa >= t1));
                ob = (V)((IV)t2 & (IV)(xb >= t2));
                va = xa - oa;
                vb = xb - ob;
                T_ *op = out + t * os + b0 + j0;
                VSTORE(op, oa); VSTORE(op + VW, ob);
            }
            VSTORE(v + b0 + j0, va); VSTORE(v + b0 + j0 + VW, vb);
        }
        if (j0 < len) {
            T_ *vb = v + b0;
            if (v0) for (int64_t j = j0; j < len; j++) vb[j] = vi[j];
            for (int64_t t = 0; t < T; t++) {
                const T_ *xb = x + t * xs + b0;
                T_ *ob = out + t * os + b0;
                for (int64_t j = j0; j < len; j++)
                    ob[j] = FN(if_step)(vb + j, x2 ? xb[j] + x2[t * x2s + b0 + j] : xb[j], th[j]);
            }
        }
    }
}

/* One vector step of the dual-threshold neuron (dual_step on every lane): m = v + x; pos = m >= θ;
 * neg = m < θ_neg and c > 0; o = θ if pos, −θ if neg and not pos, else 0; v = m − o; c = c + (pos − neg),
 * pos − neg formed as 1.0 or 0.0 per mask (exactly −1, 0 or +1, as the scalar step's conversion). */
#define DUAL_VSTEP(vv, cc, xx, tt, nn, oo)                                                            \
    do {                                                                                              \
        const V m_ = (vv) + (xx), one_ = (V){0} + (T_)1;                                              \
        const IV pos_ = (IV)(m_ >= (tt)), neg_ = (IV)(m_ < (nn)) & (IV)((cc) > (V){0});             \
        (oo) = (V)(((IV)(tt) & pos_) | ((IV)(-(tt)) & neg_ & ~pos_));                              \
        (vv) = m_ - (oo);                                                                             \
        (cc) = (cc) + ((V)((IV)one_ & pos_) - (V)((IV)one_ & neg_));                                 \
    } while (0)

/* Dual-threshold neuron:  s = +1 if m >= θ;  −1 if m < θ_neg and the count c > 0;  else 0;
 * v = m − s·θ;  c = c + s.  neg_units is θ_neg in units of θ (θ_neg = θ·neg_units, as the reference).
 * x2, x2s and v0 as for if_run (a fresh start also sets c = 0). */
void FN(dual_run)(const T_ *x, int64_t xs, const T_ *x2, int64_t x2s, T_ *out, int64_t os, T_ *v, T_ *c,
                  int64_t T, int64_t n, const T_ *theta, int64_t C, int64_t inner, double neg_units,
                  const T_ *v0, int nthreads) {
    typedef FN(vec) V;
    typedef FN(ivec) IV;
    const T_ u = (T_)neg_units;
    const int64_t nb = (n + BLOCK - 1) / BLOCK;
    PARALLEL_FOR
    for (int64_t bi = 0; bi < nb; bi++) {
        T_ th[BLOCK], thn[BLOCK], vi[BLOCK], zero[2 * VW];
        const int64_t b0 = bi * BLOCK, len = n - b0 < BLOCK ? n - b0 : BLOCK;
        FN(fill_theta)(th, theta, C, inner, b0, len);
        for (int64_t j = 0; j < len; j++) thn[j] = th[j] * u;
        if (v0) FN(fill_theta)(vi, v0, C, inner, b0, len);
        for (int64_t j = 0; j < 2 * VW; j++) zero[j] = (T_)0;
        const T_ *vsrc = v0 ? vi : v + b0;
        int64_t j0 = 0;
        for (; j0 + 2 * VW <= len; j0 += 2 * VW) {
            V t1, t2, n1, n2, va, vb, ca, cb;
            const T_ *csrc = v0 ? zero : c + b0 + j0;
            VLOAD(t1, th + j0); VLOAD(t2, th + j0 + VW);
            VLOAD(n1, thn + j0); VLOAD(n2, thn + j0 + VW);
            VLOAD(va, vsrc + j0); VLOAD(vb, vsrc + j0 + VW);
            VLOAD(ca, csrc); VLOAD(cb, csrc + VW);
            for (int64_t t = 0; t < T; t++) {
                V xa, xb, oa, ob;
                VINPUT(xa, xb, t);
                DUAL_VSTEP(va, ca, xa, t1, n1, oa);
                DUAL_VSTEP(vb, cb, xb, t2, n2, ob);
                T_ *op = out + t * os + b0 + j0;
                VSTORE(op, oa); VSTORE(op + VW, ob);
            }
            VSTORE(v + b0 + j0, va); VSTORE(v + b0 + j0 + VW, vb);
            VSTORE(c + b0 + j0, ca); VSTORE(c + b0 + j0 + VW, cb);
        }
        if (j0 < len) {
            T_ *vb = v + b0, *cb = c + b0;
            if (v0) for (int64_t j = j0; j < len; j++) { vb[j] = vi[j]; cb[j] = (T_)0; }
            for (int64_t t = 0; t < T; t++) {
                const T_ *xb = x + t * xs + b0;
                T_ *ob = out + t * os + b0;
                for (int64_t j = j0; j < len; j++)
                    ob[j] = FN(dual_step)(vb + j, cb + j, x2 ? xb[j] + x2[t * x2s + b0 + j] : xb[j], th[j], thn[j]);
            }
        }
    }
}
#undef DUAL_VSTEP
#undef VW
#undef VLOAD
#undef VSTORE
#undef VINPUT

/* A neuron layer followed by k×k average pooling with stride k (no padding), on channels-last
 * [B, H, W, C] maps, fused: the spike maps are pooled while in registers and never written. Work is
 * split over rows r = b·(H/k) + ho of the pooled map. The pooled value is the sum of the k·k outputs
 * in torch's avg_pool2d order (kernel row by row, starting from 0) divided by k·k.
 * c == NULL: IF neuron; else dual-threshold neuron with count c. */
void FN(pool_run)(const T_ *x, int64_t xs, T_ *out, int64_t os, T_ *v, T_ *c, int64_t T, int64_t B,
                  int64_t H, int64_t W, int64_t C, int64_t k, const T_ *theta, int64_t nth,
                  double neg_units, int nthreads) {
    const int64_t Ho = H / k, Wo = W / k, rowlen = W * C, orowlen = Wo * C, rows = B * Ho;
    const T_ u = (T_)neg_units, div = (T_)(k * k);
    PARALLEL_FOR
    for (int64_t r = 0; r < rows; r++) {
        T_ th[BLOCK], thn[BLOCK];
        const int64_t b = r / Ho, ho = r % Ho;
        for (int64_t c0 = 0; c0 < C; c0 += BLOCK) {
            const int64_t cl = C - c0 < BLOCK ? C - c0 : BLOCK;
            for (int64_t j = 0; j < cl; j++) {
                th[j] = nth == 1 ? theta[0] : theta[c0 + j];
                thn[j] = th[j] * u;
            }
            for (int64_t t = 0; t < T; t++) {
                T_ *orow = out + t * os + r * orowlen;
                for (int64_t wo = 0; wo < Wo; wo++) memset(orow + wo * C + c0, 0, cl * sizeof(T_));
                for (int64_t dh = 0; dh < k; dh++) {
                    const int64_t off = (b * H + ho * k + dh) * rowlen;
                    const T_ *xr = x + t * xs + off;
                    T_ *vr = v + off, *cr = c ? c + off : 0;
                    for (int64_t w = 0; w < Wo * k; w++) {
                        const T_ *xp = xr + w * C + c0;
                        T_ *vp = vr + w * C + c0, *op = orow + (w / k) * C + c0;
                        if (cr) {
                            T_ *cp = cr + w * C + c0;
                            for (int64_t j = 0; j < cl; j++) op[j] = op[j] + FN(dual_step)(vp + j, cp + j, xp[j], th[j], thn[j]);
                        } else {
                            for (int64_t j = 0; j < cl; j++) op[j] = op[j] + FN(if_step)(vp + j, xp[j], th[j]);
                        }
                    }
                }
                for (int64_t wo = 0; wo < Wo; wo++) {
                    T_ *op = orow + wo * C + c0;
                    for (int64_t j = 0; j < cl; j++) op[j] = op[j] / div;
                }
            }
        }
    }
}

/* ---- threshold clipping function ----------------------------------------------------------------
 * Reference (functional._ThresholdClipFn):  c = clamp(z, 0, λ);  h = floor(c·(L/λ) + ψ)·(λ/L), with
 * L/λ computed as (1/λ)·L (torch's int / tensor).  levels = 0: the unquantised clip h = c. */

static inline T_ FN(clamp)(T_ z, T_ lam) {
    T_ c = z < (T_)0 ? (T_)0 : z;
    return c > lam ? lam : c;
}

/* Per-element λ-gradient factor: (h − c)/λ + [z ≥ λ]  ([z ≥ λ] alone when unquantised). The division
 * is done by the reciprocal il = 1/λ (within an ulp of the reference; the sum's order differs anyway). */
static inline T_ FN(dlam)(T_ z, T_ l, T_ a, T_ s, T_ il, T_ sh, int64_t levels) {
    T_ up = z >= l ? (T_)1 : (T_)0;
    if (!levels) return up;
    T_ cc = FN(clamp)(z, l);
    return (FLOOR(cc * a + sh) * s - cc) * il + up;
}

/* Scalar λ. */
void FN(clip_fwd)(const T_ *z, T_ *h, int64_t n, const T_ *lam, int64_t levels, double shift, int nthreads) {
    const T_ L = (T_)levels, sh = (T_)shift;
    const int64_t nb = (n + BLOCK - 1) / BLOCK;
    PARALLEL_FOR
    for (int64_t bi = 0; bi < nb; bi++) {
        const int64_t b0 = bi * BLOCK, b1 = n - b0 < BLOCK ? n : b0 + BLOCK;
        const T_ l = lam[0], a = ((T_)1 / l) * L, s = l / L;
        if (levels)
            for (int64_t i = b0; i < b1; i++) h[i] = FLOOR(FN(clamp)(z[i], l) * a + sh) * s;
        else
            for (int64_t i = b0; i < b1; i++) h[i] = FN(clamp)(z[i], l);
    }
}

/* Per-channel λ: n = outer·C·inner elements; channels-last and [B, F] have inner = 1 (the channel is
 * the fastest index, so a row of C values is vectorised against a row of λ), NCHW has inner = H·W
 * (one λ per plane). */
void FN(clip_fwd_pc)(const T_ *z, T_ *h, int64_t n, const T_ *lam, int64_t C, int64_t inner, int64_t levels,
                     double shift, int nthreads) {
    const T_ L = (T_)levels, sh = (T_)shift;
    if (inner == 1) {
        const int64_t rows = n / C;
        PARALLEL_FOR
        for (int64_t r = 0; r < rows; r++) {
            const T_ *zr = z + r * C;
            T_ *hr = h + r * C;
            if (levels)
                for (int64_t c = 0; c < C; c++)
                    hr[c] = FLOOR(FN(clamp)(zr[c], lam[c]) * (((T_)1 / lam[c]) * L) + sh) * (lam[c] / L);
            else
                for (int64_t c = 0; c < C; c++) hr[c] = FN(clamp)(zr[c], lam[c]);
        }
        return;
    }
    const int64_t planes = n / inner;
    PARALLEL_FOR
    for (int64_t p = 0; p < planes; p++) {
        const T_ l = lam[p % C], a = ((T_)1 / l) * L, s = l / L;
        const T_ *zp = z + p * inner;
        T_ *hp = h + p * inner;
        if (levels)
            for (int64_t i = 0; i < inner; i++) hp[i] = FLOOR(FN(clamp)(zp[i], l) * a + sh) * s;
        else
            for (int64_t i = 0; i < inner; i++) hp[i] = FN(clamp)(zp[i], l);
    }
}

void FN(clip_bwd)(const T_ *g, const T_ *z, T_ *gz, double *partial, int64_t n, int64_t chunk, const T_ *lam,
                  int64_t levels, double shift, int want_lam, int nthreads) {
    const T_ L = (T_)levels, sh = (T_)shift;
    const T_ l = lam[0], a = ((T_)1 / l) * L, s = l / L, il = (T_)1 / l;
    const int64_t nc = (n + chunk - 1) / chunk;
    PARALLEL_FOR
    for (int64_t ci = 0; ci < nc; ci++) {
        const int64_t c0 = ci * chunk, c1 = n - c0 < chunk ? n : c0 + chunk;
        int64_t i = c0;
        if (gz)
            for (int64_t q = c0; q < c1; q++) gz[q] = (z[q] <= (T_)0 || z[q] >= l) ? (T_)0 : g[q];
        if (!want_lam) continue;
        T_ acc[LANES] = {0};
        double total = 0;
        for (; i + LANES <= c1; i += LANES)
            for (int q = 0; q < LANES; q++) acc[q] += g[i + q] * FN(dlam)(z[i + q], l, a, s, il, sh, levels);
        for (; i < c1; i++) acc[0] += g[i] * FN(dlam)(z[i], l, a, s, il, sh, levels);
        for (int q = 0; q < LANES; q++) total += (double)acc[q];
        partial[ci] += total;
    }
}

/* Per-channel λ (layout as clip_fwd_pc): gz = g where 0 < z < λ, else 0. The λ-gradient goes to
 * partial[unit·C + channel], a unit being `rows_per_unit` rows of C values (inner = 1) or one plane
 * (inner > 1), summed by one thread each: independent of the thread count. */
void FN(clip_bwd_pc)(const T_ *g, const T_ *z, T_ *gz, double *partial, int64_t n, int64_t rows_per_unit,
                     const T_ *lam, int64_t C, int64_t inner, int64_t levels, double shift, int want_lam,
                     int nthreads) {
    const T_ L = (T_)levels, sh = (T_)shift;
    if (inner == 1) {
        const int64_t rows = n / C, units = (rows + rows_per_unit - 1) / rows_per_unit;
        PARALLEL_FOR
        for (int64_t u = 0; u < units; u++) {
            const int64_t r0 = u * rows_per_unit, r1 = rows - r0 < rows_per_unit ? rows : r0 + rows_per_unit;
            double *row = partial + u * C;
            for (int64_t r = r0; r < r1; r++) {
                const T_ *gr = g + r * C, *zr = z + r * C;
                if (gz) {
                    T_ *or_ = gz + r * C;
                    for (int64_t c = 0; c < C; c++) or_[c] = (zr[c] > (T_)0 && zr[c] < lam[c]) ? gr[c] : (T_)0;
                }
                if (want_lam)
                    for (int64_t c = 0; c < C; c++)
                        row[c] += (double)(gr[c] * FN(dlam)(zr[c], lam[c], ((T_)1 / lam[c]) * L, lam[c] / L,
                                                            (T_)1 / lam[c], sh, levels));
            }
        }
        return;
    }
    const int64_t planes = n / inner;
    PARALLEL_FOR
    for (int64_t p = 0; p < planes; p++) {
        const T_ l = lam[p % C], a = ((T_)1 / l) * L, s = l / L, il = (T_)1 / l;
        const T_ *gp = g + p * inner, *zp = z + p * inner;
        if (gz) {
            T_ *op = gz + p * inner;
            for (int64_t i = 0; i < inner; i++) op[i] = (zp[i] > (T_)0 && zp[i] < l) ? gp[i] : (T_)0;
        }
        if (!want_lam) continue;
        T_ acc[LANES] = {0};
        double total = 0;
        int64_t i = 0;
        for (; i + LANES <= inner; i += LANES)
            for (int q = 0; q < LANES; q++) acc[q] += gp[i + q] * FN(dlam)(zp[i + q], l, a, s, il, sh, levels);
        for (; i < inner; i++) acc[0] += gp[i] * FN(dlam)(zp[i], l, a, s, il, sh, levels);
        for (int q = 0; q < LANES; q++) total += (double)acc[q];
        partial[p] += total;  /* unit = plane p = (outer, channel): partial[outer·C + channel] */
    }
}

#endif
