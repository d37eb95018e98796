// flash_kda: chunked Kimi Delta Attention forward for SM90 (bounded gate).
//
// A head's value axis is cut into kSplits slices of width VB; one CTA owns one (sequence,
// head, V-slice), and consecutive pairs of a (sequence, head)'s slices form one thread-block
// cluster (Config<VB>::kCluster).  The recurrent state slice S (VB value rows x 128 key
// columns, fp32) lives in the registers of the consumer warps as the accumulator of CuTe's
// SM80 16x8x16 bf16 MMA atom; it is never written to memory between chunks.
//
// Warp roles (warp specialisation):
//   * producer warps (4 per CTA), one whole 16-token chunk each: load the raw chunk (cp.async,
//     prefetched one round ahead), normalise q/k, evaluate the gate, build the decayed operands
//     Kd, Qd, Kr, the chunk total decay Gamma, T = (I + L)^-1 diag(beta) (fp32 forward
//     substitution) and the masked M = Qd Ki^T.  The preparation does not depend on the
//     V-slice, so each chunk is prepared once per cluster: CTA r's producers take the chunks c
//     with c % kCluster == r, build slot c % kSlots in their own shared memory and copy it to
//     the same slot of the other CTA (one bulk copy; the V-slice by st.async);
//   * consumer warps (VB / 16): per chunk, in order,
//        W^T = S Kd^T,  O^T = S Qd^T,  U^T = (V^T - W^T) T^T,  O^T += U^T M^T,
//        S = S diag(Gamma) + U^T Kr,   out <- O.
// Hand-off per slot through mbarriers: FULL in every CTA (32 producer-lane arrivals plus the
// copied bytes) and EMPTY in the producing CTA (every consumer lane of the cluster arrives).
// docs/algorithm.md derives the algebra; all exponents are e^{+-G} with |G| <= 80 nats because
// lower_bound >= -5 and the chunk has 16 rows.
#pragma once

#include <cute/arch/mma_sm80.hpp>
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cuda_bf16.h>

namespace flash_kda {

using bf16 = __nv_bfloat16;
using cute::uint128_t;

constexpr int kHeadK = 128;   // key head dim
constexpr int kHeadV = 128;   // value head dim
constexpr int kChunk = 16;    // tokens per chunk
constexpr int kRowPad = 136;  // bf16 row stride of 16x128 tiles read by ldmatrix (no bank conflicts)
constexpr int kSmallPad = 24; // bf16 row stride of 16x16 tiles read by ldmatrix

// State storage kinds (must match flash_kda/jit/spec.py).
constexpr int kStateNone = 0;
constexpr int kStateBF16 = 1;
constexpr int kStateFP32 = 2;

// Kernel parameters, passed by value.  Field order and types must match
// flash_kda/jit/params.py (ctypes mirror).
struct KdaParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const bf16* g;
  const bf16* beta;
  bf16* out;
  const float* A_log;     // [H] or null (a = 1)
  const float* dt_bias;   // [H, K] or null (d = 0)
  const void* initial_state;  // [N, H, V, K] or null
  void* final_state;          // [N, H, V, K] or null
  const void* cu_seqlens;     // [N + 1] int32 or int64, varlen only
  long long total_tokens;     // rows of the flattened [B * T] token axis
  int seq_len;                // T (fixed-length mode)
  int num_heads;              // H
  int num_seqs;               // N
  int cu_seqlens_int64;       // 1 when cu_seqlens is int64
  float scale;
  float lower_bound;
};

// ---------------------------------------------------------------- helpers

// ---------------------------------------------------------------- cluster and mbarrier helpers

// Launch shape of one V-slice width: the cluster size, the warp roles and the slot ring.
template <int VB>
struct Config {
  static constexpr int kSplits = kHeadV / VB;  // CTAs per (sequence, head)
  // CTAs per cluster: consecutive V-slices of one (sequence, head) that share the chunk
  // preparation.  Pairs, because clusters of 4 single-CTA SMs do not all fit at once on an H100
  // (cuOccupancyMaxActiveClusters: 30 of 33), which would leave a second wave at 128 CTAs.
  static constexpr int kCluster = kSplits < 2 ? kSplits : 2;
  static constexpr int kProducerWarps = 4;
  static constexpr int kSlots = kCluster * kProducerWarps;  // chunks in flight, one slot per producer warp
  static constexpr int kClusterV = kCluster * VB;             // value columns a producer loads
  static constexpr int kConsumerWarps = VB / 16;
  static constexpr int kConsumerThreads = kConsumerWarps * 32;
  static constexpr int kThreads = (kConsumerWarps + kProducerWarps) * 32;
};

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

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

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(bar)), "r"(count) : "memory");
}

// Arrive on the mbarrier at `bar`: a shared::cta address (this CTA) or a shared::cluster address from
// map_to_rank.  Release at CTA scope, as CUTLASS's cluster pipelines do: cluster scope would make ptxas
// add MEMBAR.ALL.GPU, which waits for every outstanding global store.  Data crosses CTAs only through
// the asynchronous copies below, whose bytes complete the barrier's transaction count.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" :: "r"(bar) : "memory");
}

// Announce `bytes` more bytes of asynchronous copies for the current phase of `bar` (shared::cluster).
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cluster.shared::cluster.b64 [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}

// Wait until the phase of the given parity of this CTA's mbarrier has completed.
__device__ __forceinline__ void mbar_wait(const uint64_t* bar, int parity) {
  const uint32_t addr = smem_addr(bar);
  uint32_t done;
  do {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done) : "r"(addr), "r"(parity) : "memory");
  } while (!done);
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

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x in one MUFU.EX2 (the libdevice exp2 adds range fix-ups: ~5 extra instructions). Arguments
// here stay in [-126, 126], so flushing subnormal results to zero changes nothing.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_exp(float x) {  // e^x
  return ex2(x * 1.4426950408889634f);
}

__device__ __forceinline__ float sigmoid(float x) {
  return __fdividef(1.0f, 1.0f + fast_exp(-x));  // 0 when e^-x overflows: the right limit
}

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

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(gmem_src),
                                                         *reinterpret_cast<uint128_t*>(smem_dst), pred);
}

// ---------------------------------------------------------------- shared memory

template <int VB>
struct Stage {  // producer -> consumer hand-off for one chunk
  bf16 kd[kChunk][kRowPad];  // k^ e^{G}
  bf16 qd[kChunk][kRowPad];  // scale q^ e^{G}
  bf16 kr[kChunk][kRowPad];  // k^ e^{G_last - G}
  bf16 t[kChunk][kSmallPad]; // (I + L)^-1 diag(beta)
  bf16 m[kChunk][kSmallPad]; // lower-triangular (incl. diagonal) Qd Ki^T
  float gamma[kHeadK];       // e^{G_last}
  bf16 v[kChunk][VB + 8];    // V chunk (token, value column), padded for ldmatrix
};

template <int CV>
struct RawChunk {  // one producer warp's raw inputs as loaded (zero-filled past the end)
  bf16 q[kChunk][kHeadK];
  bf16 k[kChunk][kHeadK];
  // g as loaded; once the gate pass has read it, k^ e^{-G} (padded rows for ldmatrix)
  bf16 g_ki[kChunk][kRowPad];
  bf16 v[kChunk][CV];  // the cluster's V-slices: each goes to its CTA
};

struct ProducerScratch {  // private to one producer warp
  float l[kChunk][kChunk + 1];
  float inv_norm_q[kChunk];
  float inv_norm_k[kChunk];
};

template <int VB>
struct SharedStorage {
  using Cfg = Config<VB>;
  Stage<VB> stage[Cfg::kSlots];
  RawChunk<Cfg::kClusterV> raw[Cfg::kProducerWarps];
  ProducerScratch scratch[Cfg::kProducerWarps];
  bf16 out[Cfg::kConsumerWarps][kChunk][kSmallPad];  // per consumer warp output staging
  uint64_t full[Cfg::kSlots];   // slot written (every CTA)
  uint64_t empty[Cfg::kSlots];  // slot consumed by every CTA (meaningful in the producing CTA)
};

// ---------------------------------------------------------------- sequence bounds

template <bool VARLEN>
__device__ __forceinline__ void sequence_bounds(const KdaParams& p, int seq, long long& bos, long long& eos) {
  if constexpr (VARLEN) {
    long long b, e;
    if (p.cu_seqlens_int64) {
      const long long* cu = static_cast<const long long*>(p.cu_seqlens);
      b = cu[seq];
      e = cu[seq + 1];
    } else {
      const int* cu = static_cast<const int*>(p.cu_seqlens);
      b = cu[seq];
      e = cu[seq + 1];
    }
    // Never trust cu_seqlens: clamp into [0, total] and treat inverted ranges as empty.
    b = b < 0 ? 0 : (b > p.total_tokens ? p.total_tokens : b);
    e = e < b ? b : (e > p.total_tokens ? p.total_tokens : e);
    bos = b;
    eos = e;
  } else {
    bos = static_cast<long long>(seq) * p.seq_len;
    eos = bos + p.seq_len;
  }
}

// ---------------------------------------------------------------- producer

template <int CV>
__device__ __forceinline__ void issue_chunk_load(const KdaParams& p, RawChunk<CV>& raw, long long row0, int valid,
                                                 int h, int v0, int lane) {
  const long long H = p.num_heads;
  // q, k, g: 16 rows x 16 vectors of 8 bf16 = 256 vectors each, 8 per lane.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int idx = lane + i * 32;
    const int r = idx >> 4, c8 = (idx & 15) * 8;
    const bool ok = r < valid;
    const long long off = ok ? ((row0 + r) * H + h) * kHeadK + c8 : 0;
    cp_async_16(&raw.q[r][c8], p.q + off, ok);
    cp_async_16(&raw.k[r][c8], p.k + off, ok);
    cp_async_16(&raw.g_ki[r][c8], p.g + off, ok);
  }
  // v: columns v0 .. v0 + CV of 16 rows.
  constexpr int kVecPerRow = CV / 8;
#pragma unroll
  for (int i = 0; i < kChunk * kVecPerRow / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = idx / kVecPerRow, c8 = (idx % kVecPerRow) * 8;
    const bool ok = r < valid;
    const long long off = ok ? ((row0 + r) * H + h) * kHeadV + v0 + c8 : 0;
    cp_async_16(&raw.v[r][c8], p.v + off, ok);
  }
  cute::cp_async_fence();
}

// Producer warp `warp` of cluster rank `rank` prepares the chunks c with c % kCluster == rank and
// (c / kCluster) % kProducerWarps == warp, i.e. chunk slot + k * kSlots, k = 0, 1, ..., always into
// slot `slot` = warp * kCluster + rank of every CTA of the cluster.  `cv0`: the cluster's first
// value column.
template <int VB>
__device__ void producer(const KdaParams& p, SharedStorage<VB>& sm, int h, int cv0, long long bos, int seq_len,
                         int num_chunks, int rank, int warp, int lane) {
  using Cfg = Config<VB>;
  constexpr int kSlots = Cfg::kSlots;
  constexpr float kLog2e = 1.4426950408889634f;
  const int slot = warp * Cfg::kCluster + rank;
  RawChunk<Cfg::kClusterV>& raw = sm.raw[warp];
  ProducerScratch& scr = sm.scratch[warp];
  Stage<VB>& st = sm.stage[slot];
  constexpr int kCluster = Cfg::kCluster;
  // What goes to the other CTAs: the slot up to its V-slice by one bulk copy, the V-slice by st.async.
  constexpr uint32_t kBulkBytes = sizeof(Stage<VB>) - sizeof(Stage<VB>::v);  // v is the last member
  constexpr uint32_t kRemoteBytes = kBulkBytes + kChunk * VB * sizeof(bf16);
  static_assert(kBulkBytes % 16 == 0, "bulk copies move 16-byte multiples");
  const int c0 = lane * 4;  // key channels c0..c0+3 owned in the element-wise pass
  // gate in log2 units: x2 = -log2(e) a (g + d); sigmoid = 1 / (1 + 2^x2); G2 += lb log2(e) sigmoid
  const float a = p.A_log != nullptr ? fast_exp(p.A_log[h]) : 1.0f;
  const float a2 = -a * kLog2e;
  float d2[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) d2[j] = a2 * (p.dt_bias != nullptr ? p.dt_bias[h * kHeadK + c0 + j] : 0.0f);
  const float lb2 = p.lower_bound * kLog2e;

  auto chunk_valid = [&](int chunk) { return min(kChunk, seq_len - chunk * kChunk); };
  auto load_beta = [&](int chunk) {
    const int r = chunk * kChunk + lane;
    return (lane < kChunk && r < seq_len) ? __bfloat162float(p.beta[(bos + r) * p.num_heads + h]) : 0.0f;
  };

  float beta_raw = 0.0f;
  if (slot < num_chunks) {
    issue_chunk_load(p, raw, bos + static_cast<long long>(slot) * kChunk, chunk_valid(slot), h, cv0, lane);
    beta_raw = load_beta(slot);
  }
  for (int chunk = slot; chunk < num_chunks; chunk += kSlots) {
    const int valid = chunk_valid(chunk);
    const float bsig = lane < valid ? sigmoid(beta_raw) : 0.0f;  // beta of row `lane` (lanes < 16)
    cute::cp_async_wait<0>();
    __syncwarp();

    // Row norms: lanes 0-15 take even rows, 16-31 odd rows; 8 channels per lane.
#pragma unroll
    for (int i = 0; i < kChunk / 2; ++i) {
      const int r = 2 * i + (lane >> 4), c8 = (lane & 15) * 8;
      const uint4 qv = *reinterpret_cast<const uint4*>(&raw.q[r][c8]);
      const uint4 kv = *reinterpret_cast<const uint4*>(&raw.k[r][c8]);
      const uint32_t qw[4] = {qv.x, qv.y, qv.z, qv.w}, kw[4] = {kv.x, kv.y, kv.z, kv.w};
      float sq = 0.0f, sk = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 qf = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qw[j]));
        const float2 kf = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kw[j]));
        sq += qf.x * qf.x + qf.y * qf.y;
        sk += kf.x * kf.x + kf.y * kf.y;
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) {
        sq += __shfl_xor_sync(0xffffffffu, sq, off);
        sk += __shfl_xor_sync(0xffffffffu, sk, off);
      }
      if ((lane & 15) == 0) {
        scr.inv_norm_q[r] = rsqrtf(sq + 1e-6f) * p.scale;
        scr.inv_norm_k[r] = rsqrtf(sk + 1e-6f);
      }
    }

    // Gate pass: cumulative log2-decay G2 for 16 rows x 4 channels.
    float G[kChunk][4];
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < kChunk; ++r) {
      const uint2 gv = *reinterpret_cast<const uint2*>(&raw.g_ki[r][c0]);
      const float2 g01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&gv.x));
      const float2 g23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&gv.y));
      const float gr[4] = {g01.x, g01.y, g23.x, g23.y};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float s = __fdividef(1.0f, 1.0f + ex2(fmaf(a2, gr[j], d2[j])));
        acc[j] = r < valid ? fmaf(lb2, s, acc[j]) : acc[j];
        G[r][j] = acc[j];
      }
    }

    // The slot must have been released by the consumers of every CTA (chunk - kSlots consumed).
    if (chunk >= kSlots) mbar_wait(&sm.empty[slot], (chunk / kSlots - 1) & 1);
    if constexpr (kCluster > 1) {
      if (lane == 0) {
#pragma unroll
        for (int j = 1; j < kCluster; ++j) {
          mbar_expect_tx(map_to_rank(smem_addr(&sm.full[slot]), (rank + j) % kCluster), kRemoteBytes);
        }
      }
    }
    __syncwarp();  // inverse norms visible, raw.g read by every lane (ki overwrites it)

    float gamma_total[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) gamma_total[j] = ex2(acc[j]);
    *reinterpret_cast<float4*>(&st.gamma[c0]) = make_float4(gamma_total[0], gamma_total[1], gamma_total[2],
                                                            gamma_total[3]);
#pragma unroll
    for (int r = 0; r < kChunk; ++r) {
      const uint2 kv = *reinterpret_cast<const uint2*>(&raw.k[r][c0]);
      const uint2 qv = *reinterpret_cast<const uint2*>(&raw.q[r][c0]);
      const float2 k01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kv.x));
      const float2 k23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kv.y));
      const float2 q01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qv.x));
      const float2 q23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qv.y));
      const float rk = scr.inv_norm_k[r], rq = scr.inv_norm_q[r];
      const float kh[4] = {k01.x * rk, k01.y * rk, k23.x * rk, k23.y * rk};
      const float qh[4] = {q01.x * rq, q01.y * rq, q23.x * rq, q23.y * rq};
      float kd[4], qd[4], ki[4], kr[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float e = ex2(G[r][j]);
        const float ei = ex2(-G[r][j]);
        kd[j] = kh[j] * e;
        qd[j] = qh[j] * e;
        ki[j] = kh[j] * ei;
        kr[j] = kh[j] * (ei * gamma_total[j]);  // e^{G_last - G}
      }
      *reinterpret_cast<uint2*>(&st.kd[r][c0]) = make_uint2(pack_bf16(kd[0], kd[1]), pack_bf16(kd[2], kd[3]));
      *reinterpret_cast<uint2*>(&st.qd[r][c0]) = make_uint2(pack_bf16(qd[0], qd[1]), pack_bf16(qd[2], qd[3]));
      *reinterpret_cast<uint2*>(&st.kr[r][c0]) = make_uint2(pack_bf16(kr[0], kr[1]), pack_bf16(kr[2], kr[3]));
      *reinterpret_cast<uint2*>(&raw.g_ki[r][c0]) = make_uint2(pack_bf16(ki[0], ki[1]), pack_bf16(ki[2], ki[3]));
    }
    // V: the cluster's slice j (columns j*VB ...) into the slot of its CTA of rank j (16-byte vectors).
    // A lane's columns are the same in every row it copies, so is its destination.
    {
      constexpr int kVecPerRow = Cfg::kClusterV / 8;
      const int c8 = (lane % kVecPerRow) * 8, to = c8 / VB;
      const uint32_t to_full = map_to_rank(smem_addr(&sm.full[slot]), to);
#pragma unroll
      for (int i = 0; i < kChunk * kVecPerRow / 32; ++i) {
        const int r = (lane + i * 32) / kVecPerRow;
        const uint4 val = *reinterpret_cast<const uint4*>(&raw.v[r][c8]);
        uint4* dst = reinterpret_cast<uint4*>(&st.v[r][c8 % VB]);
        if (kCluster == 1 || to == rank) {
          *dst = val;
        } else {
          st_async_16(map_to_rank(smem_addr(dst), to), val, to_full);
        }
      }
    }
    __syncwarp();  // stage operands and ki written

    // L = Kd Ki^T and M = Qd Ki^T (16x16, reduction over 128 channels).
    const int gq = lane >> 2, tq = lane & 3;
    const LdsmLane al = ldsm_a_lane(lane), bl = ldsm_b_lane(lane);
    float accL[2][4] = {}, accM[2][4] = {};
#pragma unroll
    for (int ks = 0; ks < kHeadK / 16; ++ks) {
      uint32_t kdf[4], qdf[4], kib[4];
      ldsm_x4(&st.kd[al.row][ks * 16 + al.col], kdf[0], kdf[1], kdf[2], kdf[3]);
      ldsm_x4(&st.qd[al.row][ks * 16 + al.col], qdf[0], qdf[1], qdf[2], qdf[3]);
      ldsm_x4(&raw.g_ki[bl.row][ks * 16 + bl.col], kib[0], kib[1], kib[2], kib[3]);
      mma16816(accL[0], kdf, kib[0], kib[1]);
      mma16816(accL[1], kdf, kib[2], kib[3]);
      mma16816(accM[0], qdf, kib[0], kib[1]);
      mma16816(accM[1], qdf, kib[2], kib[3]);
    }
    __syncwarp();  // raw (ki included) fully read
    // Prefetch this warp's next chunk while the rest of this one is finished.
    if (chunk + kSlots < num_chunks) {
      issue_chunk_load(p, raw, bos + static_cast<long long>(chunk + kSlots) * kChunk, chunk_valid(chunk + kSlots), h,
                       cv0, lane);
      beta_raw = load_beta(chunk + kSlots);
    }
    const float beta_lo = __shfl_sync(0xffffffffu, bsig, gq), beta_hi = __shfl_sync(0xffffffffu, bsig, gq + 8);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int i = gq + hh * 8, j = nt * 8 + tq * 2;
        const float b = hh ? beta_hi : beta_lo;
        scr.l[i][j] = i > j ? b * accL[nt][hh * 2] : 0.0f;
        scr.l[i][j + 1] = i > j + 1 ? b * accL[nt][hh * 2 + 1] : 0.0f;
        const float m0 = i >= j ? accM[nt][hh * 2] : 0.0f;
        const float m1 = i >= j + 1 ? accM[nt][hh * 2 + 1] : 0.0f;
        *reinterpret_cast<uint32_t*>(&st.m[i][j]) = pack_bf16(m0, m1);
      }
    }
    __syncwarp();
    if (lane < kChunk) {
      // Forward substitution (fp32), right-looking so each step's updates are independent:
      // column `lane` of X = (I + L)^-1 diag(beta).
      float x[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) x[i] = i == lane ? bsig : 0.0f;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
#pragma unroll
        for (int i = j + 1; i < kChunk; ++i) x[i] -= scr.l[i][j] * x[j];
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) st.t[i][lane] = __float2bfloat16_rn(x[i]);
    }
    if constexpr (kCluster > 1) {
      // The slot is complete here: copy it to the other CTAs of the cluster.
      fence_proxy_async_smem();
      __syncwarp();
      if (lane == 0) {
#pragma unroll
        for (int j = 1; j < kCluster; ++j) {
          const uint32_t to = (rank + j) % kCluster;
          bulk_copy_to_cluster(map_to_rank(smem_addr(&st), to), &st, kBulkBytes,
                               map_to_rank(smem_addr(&sm.full[slot]), to));
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kCluster; ++j) {  // every lane, on every CTA's barrier (its own first)
      mbar_arrive(j == 0 ? smem_addr(&sm.full[slot]) : map_to_rank(smem_addr(&sm.full[slot]), (rank + j) % kCluster));
    }
  }
}

// ---------------------------------------------------------------- consumer

template <int VB, int STATE_IN, int STATE_OUT>
__device__ void consumer(const KdaParams& p, SharedStorage<VB>& sm, int seq, int h, int v0, long long bos,
                         int seq_len, int num_chunks, int cw, int lane) {
  constexpr int kSlots = Config<VB>::kSlots;
  constexpr int kCluster = Config<VB>::kCluster;
  constexpr int kTiles = kHeadK / 8;  // 16 accumulator tiles of 16x8 across the key axis
  const int gq = lane >> 2, tq = lane & 3;
  const LdsmLane al = ldsm_a_lane(lane), bl = ldsm_b_lane(lane);  // ldmatrix.x4 lane addresses
  const int row_lo = v0 + cw * 16 + gq;  // value row of accumulator elements 0,1 (elements 2,3: +8)
  const long long state_base = (static_cast<long long>(seq) * p.num_heads + h) * kHeadV * kHeadK;

  // S[v][k]: tile n covers keys 8n..8n+7; element e: row row_lo + 8*(e>>1), key 8n + 2tq + (e&1).
  float S[kTiles][4];
#pragma unroll
  for (int n = 0; n < kTiles; ++n) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const long long idx = state_base + static_cast<long long>(row_lo + hh * 8) * kHeadK + n * 8 + tq * 2;
      float2 val = make_float2(0.0f, 0.0f);
      if constexpr (STATE_IN == kStateFP32) {
        val = *reinterpret_cast<const float2*>(static_cast<const float*>(p.initial_state) + idx);
      } else if constexpr (STATE_IN == kStateBF16) {
        val = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(static_cast<const bf16*>(p.initial_state) + idx));
      }
      S[n][hh * 2] = val.x;
      S[n][hh * 2 + 1] = val.y;
    }
  }

  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    const int s = chunk % kSlots;
    const Stage<VB>& st = sm.stage[s];
    mbar_wait(&sm.full[s], (chunk / kSlots) & 1);

    // W^T = S Kd^T and O^T = S Qd^T (16 value rows x 16 tokens per warp).
    float W[2][4] = {}, O[2][4] = {};
#pragma unroll
    for (int ks = 0; ks < kHeadK / 16; ++ks) {
      uint32_t af[4] = {pack_bf16(S[2 * ks][0], S[2 * ks][1]), pack_bf16(S[2 * ks][2], S[2 * ks][3]),
                        pack_bf16(S[2 * ks + 1][0], S[2 * ks + 1][1]), pack_bf16(S[2 * ks + 1][2], S[2 * ks + 1][3])};
      uint32_t kb[4], qb[4];
      ldsm_x4(&st.kd[bl.row][ks * 16 + bl.col], kb[0], kb[1], kb[2], kb[3]);
      ldsm_x4(&st.qd[bl.row][ks * 16 + bl.col], qb[0], qb[1], qb[2], qb[3]);
      mma16816(W[0], af, kb[0], kb[1]);
      mma16816(W[1], af, kb[2], kb[3]);
      mma16816(O[0], af, qb[0], qb[1]);
      mma16816(O[1], af, qb[2], qb[3]);
    }

    // X^T = V^T - W^T as an A fragment (value rows x tokens); V^T by a transposed ldmatrix.
    uint32_t xf[4];
    {
      uint32_t vf[4];
      ldsm_x4_t(&st.v[bl.row][cw * 16 + bl.col], vf[0], vf[1], vf[2], vf[3]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int nt = e >> 1, hh = e & 1;
        const float2 v2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&vf[e]));
        xf[e] = pack_bf16(v2.x - W[nt][hh * 2], v2.y - W[nt][hh * 2 + 1]);
      }
    }
    // U^T = X^T T^T: B[k][n] = T[n][k].
    float U[2][4] = {};
    {
      uint32_t tb[4];
      ldsm_x4(&st.t[bl.row][bl.col], tb[0], tb[1], tb[2], tb[3]);
      mma16816(U[0], xf, tb[0], tb[1]);
      mma16816(U[1], xf, tb[2], tb[3]);
    }
    const uint32_t uf[4] = {pack_bf16(U[0][0], U[0][1]), pack_bf16(U[0][2], U[0][3]), pack_bf16(U[1][0], U[1][1]),
                            pack_bf16(U[1][2], U[1][3])};
    // O^T += U^T M^T: B[k][n] = M[n][k].
    {
      uint32_t mb[4];
      ldsm_x4(&st.m[bl.row][bl.col], mb[0], mb[1], mb[2], mb[3]);
      mma16816(O[0], uf, mb[0], mb[1]);
      mma16816(O[1], uf, mb[2], mb[3]);
    }
    // S = S diag(Gamma) + U^T Kr: B[k = token][n = key] from Kr (transposed load).
#pragma unroll
    for (int n = 0; n < kTiles; n += 2) {
      uint32_t rb[4];
      ldsm_x4_t(&st.kr[al.row][n * 8 + al.col], rb[0], rb[1], rb[2], rb[3]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float2 gm = *reinterpret_cast<const float2*>(&st.gamma[(n + j) * 8 + tq * 2]);
        S[n + j][0] *= gm.x;
        S[n + j][1] *= gm.y;
        S[n + j][2] *= gm.x;
        S[n + j][3] *= gm.y;
      }
      mma16816(S[n], uf, rb[0], rb[1]);
      mma16816(S[n + 1], uf, rb[2], rb[3]);
    }
    // The slot is no longer needed here: tell its producing CTA (rank s % kCluster).
    if (chunk + kSlots < num_chunks) {
      const uint32_t empty = smem_addr(&sm.empty[s]);
      mbar_arrive(kCluster == 1 ? empty : map_to_rank(empty, s % kCluster));
    }

    // out: stage O (value rows x tokens) through shared memory, then 16-byte stores.
    bf16(*os)[kSmallPad] = sm.out[cw];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int nt = e >> 2, hh = (e >> 1) & 1, lo = e & 1;
      os[nt * 8 + tq * 2 + lo][gq + hh * 8] = __float2bfloat16_rn(O[nt][hh * 2 + lo]);
    }
    __syncwarp();
    {
      const int tok = lane >> 1, half = lane & 1;
      const int t = chunk * kChunk + tok;
      if (t < seq_len) {
        const long long off = ((bos + t) * p.num_heads + h) * kHeadV + v0 + cw * 16 + half * 8;
        *reinterpret_cast<uint4*>(p.out + off) = *reinterpret_cast<const uint4*>(&os[tok][half * 8]);
      }
    }
    __syncwarp();
  }

  if constexpr (STATE_OUT != kStateNone) {
#pragma unroll
    for (int n = 0; n < kTiles; ++n) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const long long idx = state_base + static_cast<long long>(row_lo + hh * 8) * kHeadK + n * 8 + tq * 2;
        if constexpr (STATE_OUT == kStateFP32) {
          *reinterpret_cast<float2*>(static_cast<float*>(p.final_state) + idx) = make_float2(S[n][hh * 2], S[n][hh * 2 + 1]);
        } else {
          *reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(p.final_state) + idx) =
              __floats2bfloat162_rn(S[n][hh * 2], S[n][hh * 2 + 1]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- entry

template <int VB, int STATE_IN, int STATE_OUT, bool VARLEN>
__device__ __forceinline__ void kda_fwd(const KdaParams& p) {
  static_assert(VB % 16 == 0 && kHeadV % VB == 0, "VB must divide the value head dim in 16-row slices");
  using Cfg = Config<VB>;
  constexpr int kSplits = Cfg::kSplits;
  constexpr int kCluster = Cfg::kCluster;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  SharedStorage<VB>& sm = *reinterpret_cast<SharedStorage<VB>*>(smem_raw);

  // The kSplits V-slices of one (sequence, head) are consecutive blocks; each run of kCluster of
  // them is one cluster (the grid is a multiple of kSplits, so clusters never straddle heads).
  const int block = blockIdx.x;
  const int split = block % kSplits;
  const int rank = kCluster == 1 ? 0 : static_cast<int>(cluster_rank());  // == split % kCluster
  const int h = (block / kSplits) % p.num_heads;
  const int seq = block / kSplits / p.num_heads;
  const int v0 = split * VB;
  long long bos, eos;
  sequence_bounds<VARLEN>(p, seq, bos, eos);
  const int seq_len = static_cast<int>(eos - bos);
  const int num_chunks = (seq_len + kChunk - 1) / kChunk;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < Cfg::kSlots; ++s) {
      mbar_init(&sm.full[s], 32);                                  // the producing warp's lanes
      mbar_init(&sm.empty[s], kCluster * Cfg::kConsumerThreads);   // every consumer lane of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // Barriers initialised in every CTA before any CTA's producer or consumer touches them.
  if constexpr (kCluster > 1) cluster_sync(); else __syncthreads();

  if (threadIdx.x >= Cfg::kConsumerThreads) {
    const int ptid = threadIdx.x - Cfg::kConsumerThreads;
    producer<VB>(p, sm, h, (split - rank) * VB, bos, seq_len, num_chunks, rank, ptid >> 5, ptid & 31);
  } else {
    consumer<VB, STATE_IN, STATE_OUT>(p, sm, seq, h, v0, bos, seq_len, num_chunks, threadIdx.x >> 5, threadIdx.x & 31);
  }
  // No CTA leaves while another may still write into its slots or arrive on its barriers.
  if constexpr (kCluster > 1) cluster_sync();
}

}  // namespace flash_kda
