// flash_kda: the gate, i.e. each token's per-channel log decay gamma (docs/algorithm.md, section 1).
//
// Kernels work in log2 units (decay = 2^G2) so that every exponential is one ex2.approx.
// A gate object is built once per (head, four key channels) and then accumulates gamma2 per token.
// The kernels take the gate as a template parameter (spec.py GATES names the type per gate kind); a
// gate kind provides: `Raw` and `static Raw load(p, h, c0)` (its parameters as stored), constructors
// from (p, raw) and from (p, h, c0), `float accumulate(float G2, float g, int j) const`, and
// `kFactorised`: whether the chunked kernel may factorise a chunk's decay as e^{+G} e^{-G} (true only
// where a 16-token chunk decays by at most 80 nats, i.e. lower_bound >= -5) or must use the anchored
// form (kda_chunk_anchored.cuh) that holds for any finite gate. The decode kernel takes every kind.
#pragma once

#include "kda_params.cuh"

namespace flash_kda {

// gamma = lb * sigmoid(a (g + d)) with a = e^{A_log}, d = dt_bias; in log2 units
//   gamma2 = lb log2(e) / (1 + 2^(-log2(e) a (g + d))).
struct BoundedGate {
  static constexpr bool kFactorised = true;
  float a2;     // -log2(e) a
  float d2[4];  // -log2(e) a d, per channel
  float lb2;    // lb log2(e)

  // The head's parameters as stored: A_log[h] and dt_bias[h, c0 .. c0 + 3] (loaded by `load`).
  struct Raw {
    float a_log;
    float4 dt;
  };

  __device__ __forceinline__ static Raw load(const KdaParams& p, int h, int c0) {
    Raw raw{0.0f, make_float4(0.0f, 0.0f, 0.0f, 0.0f)};
    if (p.A_log != nullptr) raw.a_log = p.A_log[h];
    if (p.dt_bias != nullptr) raw.dt = *reinterpret_cast<const float4*>(p.dt_bias + h * kHeadK + c0);
    return raw;
  }

  __device__ __forceinline__ BoundedGate(const KdaParams& p, const Raw& raw) {
    const float a = p.A_log != nullptr ? fast_exp(raw.a_log) : 1.0f;
    a2 = -a * kLog2e;
    d2[0] = a2 * raw.dt.x, d2[1] = a2 * raw.dt.y, d2[2] = a2 * raw.dt.z, d2[3] = a2 * raw.dt.w;
    lb2 = p.lower_bound * kLog2e;
  }

  __device__ __forceinline__ BoundedGate(const KdaParams& p, int h, int c0) : BoundedGate(p, load(p, h, c0)) {}

  // G2 + gamma2 of raw gate logit g on channel c0 + j.
  __device__ __forceinline__ float accumulate(float G2, float g, int j) const {
    const float s = __fdividef(1.0f, 1.0f + ex2(fmaf(a2, g, d2[j])));
    return fmaf(lb2, s, G2);
  }
};

// The bounded gate with lower_bound < -5 (any finite value): the same math, the anchored chunk form.
struct WideBoundedGate : BoundedGate {
  static constexpr bool kFactorised = false;
  using BoundedGate::BoundedGate;
};

// gamma = -a softplus(g + d) (Kimi Linear's gate, lower_bound=None), unbounded below; in log2 units,
// with y = log2(e) (g + d):  gamma2 = -a log2(1 + 2^y), which is -a y to fp32 precision once y > 25
// (and 2^y cannot overflow below that). For y < -24, 2^y vanishes next to 1 and gamma2 is 0: the true
// decay then differs from 1 by less than a e^-16, which fp32 cannot hold either (docs/algorithm.md).
struct SoftplusGate {
  static constexpr bool kFactorised = false;
  using Raw = BoundedGate::Raw;
  float a;      // e^{A_log}
  float d2[4];  // log2(e) d, per channel

  __device__ __forceinline__ static Raw load(const KdaParams& p, int h, int c0) { return BoundedGate::load(p, h, c0); }

  __device__ __forceinline__ SoftplusGate(const KdaParams& p, const Raw& raw) {
    a = p.A_log != nullptr ? fast_exp(raw.a_log) : 1.0f;
    d2[0] = kLog2e * raw.dt.x, d2[1] = kLog2e * raw.dt.y, d2[2] = kLog2e * raw.dt.z, d2[3] = kLog2e * raw.dt.w;
  }

  __device__ __forceinline__ SoftplusGate(const KdaParams& p, int h, int c0) : SoftplusGate(p, load(p, h, c0)) {}

  __device__ __forceinline__ float accumulate(float G2, float g, int j) const {
    return fmaf(-a, softplus2(fmaf(kLog2e, g, d2[j])), G2);
  }

  // log2(1 + 2^y), or y above 25. One PTX block, so that the compiler neither branches around the two MUFU
  // (a C++ `?:` there became a branch per element, benchmarks/NOTES.md "Every gate, 1") nor needs a clamp
  // on 2^y: ptxas predicates the lg2 on y <= 25, and the +inf of 2^y above y = 128 is never read.
  __device__ __forceinline__ static float softplus2(float y) {
    float result;
    asm("{\n\t.reg .pred large;\n\t.reg .f32 t;\n\t"
        "setp.gt.f32 large, %1, 0f41C80000;\n\t"  // 25.0
        "ex2.approx.ftz.f32 t, %1;\n\t"
        "add.f32 t, t, 0f3F800000;\n\t"           // 1.0
        "lg2.approx.ftz.f32 t, t;\n\t"
        "selp.f32 %0, %1, t, large;\n\t}"
        : "=f"(result) : "f"(y));
    return result;
  }
};

// The softplus gate with the clamp of y in C++ (one FMNMX more an element than SoftplusGate::softplus2;
// bitwise the same values). The 32-wide chunked kernel runs it (spec.CHUNK_GATE_TYPES): there the
// clamp-free form measured 3% slower, where it is 1-2.5% faster at 64 and 128 wide (benchmarks/NOTES.md,
// round 10).
struct ClampedSoftplusGate : SoftplusGate {
  using SoftplusGate::SoftplusGate;

  __device__ __forceinline__ float accumulate(float G2, float g, int j) const {
    const float y = fmaf(kLog2e, g, d2[j]);
    const float small = lg2(1.0f + ex2(fminf(y, 25.0f)));  // both sides evaluated: a select, not a branch
    return fmaf(-a, y > 25.0f ? y : small, G2);
  }
};

}  // namespace flash_kda
