// flash_kda: architecture primitives used by the kernels, one wrapper per instruction.
//
// Everything below sm_90 (mma.sync, ldmatrix, cp.async, mbarrier arrive / test_wait, ex2.approx)
// runs on sm_80 and later. The cluster, mbarrier-transaction and bulk-copy wrappers need sm_90 and
// are referenced only by the clustered chunk kernel (Config::kCluster > 1); the wrappers both kernels
// use pick their sm_90 instruction where __CUDA_ARCH__ has it, and an sm_80 one elsewhere.
#pragma once

#include <cute/arch/mma_sm80.hpp>
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cuda_bf16.h>

namespace flash_kda {

using bf16 = __nv_bfloat16;
using cute::uint128_t;

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// A copy of `x` the optimiser cannot see through (an empty asm that "modifies" it): what is computed
// from the copy is computed again where it is used, instead of being held in registers since `x` was
// first known.
__device__ __forceinline__ int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

// ---------------------------------------------------------------- mbarriers (sm_80+)

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(bar)), "r"(count) : "memory");
}

// Makes this thread's mbarrier initialisations visible to the whole cluster (before a cluster barrier).
// Without clusters (below sm_90) the __syncthreads that follows is enough.
__device__ __forceinline__ void mbar_init_fence() {
#if __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// Arrive on this CTA's mbarrier (release at CTA scope).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" :: "r"(smem_addr(bar)) : "memory");
#else
  uint64_t state;  // sm_80 has no sink operand for the arrival's phase token
  asm volatile("mbarrier.arrive.shared.b64 %0, [%1];" : "=l"(state) : "r"(smem_addr(bar)) : "memory");
#endif
}

// Wait until the phase of the given parity of this CTA's mbarrier has completed: try_wait suspends the
// thread for a while (sm_90); test_wait (sm_80) polls.
__device__ __forceinline__ void mbar_wait(const uint64_t* bar, int parity) {
  const uint32_t addr = smem_addr(bar);
  uint32_t done;
  do {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done) : "r"(addr), "r"(parity) : "memory");
#else
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.test_wait.parity.shared.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done) : "r"(addr), "r"(parity) : "memory");
#endif
  } while (!done);
}

// ---------------------------------------------------------------- clusters (sm_90)

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}

// The shared::cluster address of `addr` (a shared::cta address) in the CTA of rank `rank`.
__device__ __forceinline__ uint32_t map_to_rank(uint32_t addr, uint32_t rank) {
  uint32_t mapped;
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(mapped) : "r"(addr), "r"(rank));
  return mapped;
}

__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}

// Arrive on the mbarrier at `bar`: a shared::cta address (this CTA) or a shared::cluster address from
// map_to_rank.  Release at CTA scope, as CUTLASS's cluster pipelines do: cluster scope would make ptxas
// add MEMBAR.ALL.GPU, which waits for every outstanding global store.  Data crosses CTAs only through
// the asynchronous copies below, whose bytes complete the barrier's transaction count.
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" :: "r"(bar) : "memory");
}

// Announce `bytes` more bytes of asynchronous copies for the current phase of `bar` (shared::cluster).
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cluster.shared::cluster.b64 [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}

// 16 bytes into another CTA's shared memory; their arrival completes 16 bytes of `bar`'s transaction count.
__device__ __forceinline__ void st_async_16(uint32_t addr, const uint4& v, uint32_t bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
               :: "r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(bar) : "memory");
}

// Bulk copy of this CTA's shared memory into another CTA's (the TMA unit); completes `bytes` of `bar`.
__device__ __forceinline__ void bulk_copy_to_cluster(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "r"(smem_addr(src)), "r"(bytes), "r"(bar) : "memory");
}

// Generic-proxy writes to shared memory become visible to the async proxy (the bulk copy).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// ---------------------------------------------------------------- register reallocation (sm_90a, sm_100a, sm_103a)

// setmaxnreg: the 'a' targets of Hopper and datacenter Blackwell (jit/arch.py, Arch.register_reallocation,
// names the same targets). Every warp of a warpgroup executes it; the registers move between the CTA's
// warpgroups, so a kernel that raises one warpgroup's count lowers the others' first.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(__CUDA_ARCH_FEAT_SM100_ALL) || defined(__CUDA_ARCH_FEAT_SM103_ALL)
#define FLASH_KDA_REGISTER_REALLOCATION 1
#else
#define FLASH_KDA_REGISTER_REALLOCATION 0
#endif

#if FLASH_KDA_REGISTER_REALLOCATION
template <int kRegisters>
__device__ __forceinline__ void raise_register_count() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(kRegisters));
}

template <int kRegisters>
__device__ __forceinline__ void lower_register_count() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(kRegisters));
}
#endif

// ---------------------------------------------------------------- math

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float2 unpack_bf16(uint32_t packed) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&packed));
}

__device__ __forceinline__ float4 unpack_bf16x4(uint2 packed) {  // four consecutive bf16
  const float2 lo = unpack_bf16(packed.x), hi = unpack_bf16(packed.y);
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// 2^x in one MUFU.EX2 (the libdevice exp2 adds range fix-ups: ~5 extra instructions). Subnormal
// results flush to zero, and any argument below -126 (the general gates' decays) gives 0: terms that
// small are below fp32's resolution of everything they are added to (docs/algorithm.md).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float lg2(float x) {  // log2(x), lg2.approx: absolute error ~2^-22 near 1
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float fast_exp(float x) {  // e^x
  return ex2(x * kLog2e);
}

__device__ __forceinline__ float sigmoid(float x) {
  return __fdividef(1.0f, 1.0f + fast_exp(-x));  // 0 when e^-x overflows: the right limit
}

// The warp sums of N per-lane partials (N = 2, 4, ..., 32) with N - 1 + (5 - log2 N) shuffles in place of
// 5 N: each step sends the half of the values a lane gives away and keeps the other half (a
// reduce-scatter), then plain butterflies finish. Lane L ends with the whole sum of value
// (L >> (5 - log2 N)) & (N - 1), i.e. lanes (32 / N) m .. (32 / N) (m + 1) - 1 hold value m.
template <int N>
__device__ __forceinline__ float warp_reduce_scatter(float (&a)[N], int lane) {
  static_assert(N >= 2 && N <= 32 && (N & (N - 1)) == 0, "N must be a power of two up to 32");
  constexpr int kSteps = N == 2 ? 1 : N == 4 ? 2 : N == 8 ? 3 : N == 16 ? 4 : 5;  // log2 N
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int half = N >> (step + 1), offset = 16 >> step;
    const bool upper = lane & offset;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      if (i < half) a[i] = (upper ? a[i + half] : a[i]) + __shfl_xor_sync(kFullMask, upper ? a[i] : a[i + half], offset);
    }
  }
  float sum = a[0];
#pragma unroll
  for (int offset = 16 >> kSteps; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  return sum;
}

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// ---------------------------------------------------------------- tensor-core fragments (sm_80+)

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1,
                                            d[0], d[1], d[2], d[3]);
}

// Where lane `lane` points ldmatrix.x4 inside a 16x16 bf16 tile, for the 16x8x16 MMA:
//   * ldsm_a_lane: the A fragment (rows = M); also B from a [k][n] tile with the .trans load;
//   * ldsm_b_lane: the two B fragments n 0-7 and 8-15 from a [n][k] tile.
struct LdsmLane {
  int row, col;
};
__device__ __forceinline__ LdsmLane ldsm_a_lane(int lane) { return {(lane & 7) + ((lane >> 3) & 1) * 8, (lane >> 4) * 8}; }
__device__ __forceinline__ LdsmLane ldsm_b_lane(int lane) { return {(lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8}; }

__device__ __forceinline__ void ldsm_x4(const void* smem_row, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                        uint32_t& r3) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const uint128_t*>(smem_row), r0, r1, r2, r3);
}
__device__ __forceinline__ void ldsm_x4_t(const void* smem_row, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                          uint32_t& r3) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const uint128_t*>(smem_row), r0, r1, r2, r3);
}

// ---------------------------------------------------------------- predicated global loads

// A global load issued only where `pred` holds, and 0 elsewhere: one predicated PTX load, no branch.
// Several of them form one straight run of loads that the compiler issues before any is used; behind C++
// conditionals it may branch around one and wait for an earlier load before it issues the next.
__device__ __forceinline__ uint32_t ld_global_u32_if(const void* ptr, bool pred) {
  uint32_t x;
  asm volatile("{\n\t.reg .pred p;\n\t.reg .b32 t;\n\tsetp.ne.b32 p, %2, 0;\n\tmov.b32 t, 0;\n\t"
               "@p ld.global.b32 t, [%1];\n\tmov.b32 %0, t;\n}" : "=r"(x) : "l"(ptr), "r"(static_cast<int>(pred)));
  return x;
}

__device__ __forceinline__ uint32_t ld_global_u8_if(const void* ptr, bool pred) {
  uint32_t x;
  asm volatile("{\n\t.reg .pred p;\n\t.reg .b32 t;\n\tsetp.ne.b32 p, %2, 0;\n\tmov.b32 t, 0;\n\t"
               "@p ld.global.u8 t, [%1];\n\tmov.b32 %0, t;\n}" : "=r"(x) : "l"(ptr), "r"(static_cast<int>(pred)));
  return x;
}

// ---------------------------------------------------------------- asynchronous global -> shared copies (sm_80+)

// With `pred` false this one still writes: 16 zero bytes (cp_async_16_if below writes nothing).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(gmem_src),
                                                         *reinterpret_cast<uint128_t*>(smem_dst), pred);
}

__device__ __forceinline__ void cp_async_8(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(smem_addr(smem_dst)), "l"(gmem_src) : "memory");
}

// Copies that `pred` turns off (nothing is read or written), each one predicated instruction: no branch
// around them, whatever `pred` depends on. The 16-byte one bypasses L1, as cp_async_16.
__device__ __forceinline__ void cp_async_8_if(void* smem_dst, const void* gmem_src, bool pred) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p cp.async.ca.shared.global [%0], [%1], 8;\n}\n"
               :: "r"(smem_addr(smem_dst)), "l"(gmem_src), "r"(static_cast<int>(pred)) : "memory");
}

__device__ __forceinline__ void cp_async_16_if(void* smem_dst, const void* gmem_src, bool pred) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n}\n"
               :: "r"(smem_addr(smem_dst)), "l"(gmem_src), "r"(static_cast<int>(pred)) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {  // this thread's copies have landed
  asm volatile("cp.async.wait_all;" ::: "memory");
}

__device__ __forceinline__ void cp_async_commit() {  // close this thread's copies issued so far into a group
  asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int PENDING>
__device__ __forceinline__ void cp_async_wait_groups() {  // all but this thread's newest PENDING groups landed
  asm volatile("cp.async.wait_group %0;" :: "n"(PENDING) : "memory");
}

// The same for a count known at run time (wait_group takes an immediate); counts above 3 wait as 3 does.
__device__ __forceinline__ void cp_async_wait_groups(int pending) {
  switch (pending) {
    case 0: cp_async_wait_groups<0>(); break;
    case 1: cp_async_wait_groups<1>(); break;
    case 2: cp_async_wait_groups<2>(); break;
    default: cp_async_wait_groups<3>(); break;
  }
}

}  // namespace flash_kda
