// flash_kda: chunked Kimi Delta Attention forward for SM90 (bounded gate).
//
// One CTA owns one (sequence, head, V-slice of width VB).  The recurrent state
// slice S (VB value rows x 128 key columns, fp32) lives in the registers of the
// consumer warps as the accumulator of CuTe's SM80 16x8x16 bf16 MMA atom; it is
// never written to memory between chunks.
//
// Warp roles (warp specialisation, hand-off through named barriers):
//   * producer warps (4): load the raw chunk (cp.async, one chunk ahead), normalise
//     q/k, evaluate the gate, build the decayed operands Kd, Qd, Kr, the chunk
//     total decay Gamma, T = (I + L)^-1 diag(beta) (fp32 forward substitution) and
//     the masked M = Qd Ki^T, into a shared-memory stage (double buffered);
//   * consumer warps (VB / 16): per chunk,
//        W^T = S Kd^T,  O^T = S Qd^T,  U^T = (V^T - W^T) T^T,  O^T += U^T M^T,
//        S = S diag(Gamma) + U^T Kr,   out <- O.
// SPEC section 2 gives the algebra; all exponents are e^{+-G} with |G| <= 80
// nats because lower_bound >= -5 and the chunk has 16 rows.
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
constexpr int kProducerWarps = 4;
constexpr int kStages = 2;
constexpr int kRowPad = 136;  // bf16 row stride of 16x128 tiles read by ldmatrix (no bank conflicts)
constexpr int kSmallPad = 24; // bf16 row stride of 16x16 tiles read by ldmatrix

// State storage kinds (must match flash_kda/jit/spec.py).
constexpr int kStateNone = 0;
constexpr int kStateBF16 = 1;
constexpr int kStateFP32 = 2;

// Kernel parameters, passed by value.  Field order and types must match
// flash_kda/jit/launch.py (ctypes mirror).
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

__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float fast_exp(float x) {  // e^x via ex2.approx
  return exp2f(x * 1.4426950408889634f);
}

__device__ __forceinline__ float sigmoid(float x) {
  return __fdividef(1.0f, 1.0f + fast_exp(-x));  // 0 when e^-x overflows: the right limit
}

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1,
                                            d[0], d[1], d[2], d[3]);
}

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
  bf16 vt[VB][kSmallPad];    // V chunk, transposed (value column, token)
};

template <int VB>
struct RawChunk {  // raw inputs as loaded from global memory (zero-filled past the end)
  bf16 q[kChunk][kHeadK];
  bf16 k[kChunk][kHeadK];
  bf16 g[kChunk][kHeadK];
  bf16 v[kChunk][VB];
};

template <int VB>
struct SharedStorage {
  Stage<VB> stage[kStages];
  RawChunk<VB> raw[2];
  bf16 ki[kChunk][kRowPad];  // k^ e^{-G} (producer only)
  float l[kChunk][kChunk + 1];
  float inv_norm_q[kChunk];
  float inv_norm_k[kChunk];
  float beta[kChunk];
  bf16 out[VB / 16][kChunk][kSmallPad];  // per consumer warp output staging
};

// Named barrier ids (0 is __syncthreads).
constexpr int kBarFull0 = 1;    // + stage
constexpr int kBarEmpty0 = 3;   // + stage
constexpr int kBarProducer = 5;

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

template <int VB>
__device__ __forceinline__ void issue_chunk_load(const KdaParams& p, RawChunk<VB>& raw, long long row0, int valid,
                                                 int h, int v0, int ptid) {
  const long long H = p.num_heads;
  // q, k, g: 16 rows x 16 vectors of 8 bf16; 2 vectors per producer thread each.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int idx = ptid + i * 128;
    const int r = idx >> 4, c8 = (idx & 15) * 8;
    const bool ok = r < valid;
    const long long off = ok ? ((row0 + r) * H + h) * kHeadK + c8 : 0;
    cp_async_16(&raw.q[r][c8], p.q + off, ok);
    cp_async_16(&raw.k[r][c8], p.k + off, ok);
    cp_async_16(&raw.g[r][c8], p.g + off, ok);
  }
  constexpr int kVecPerRowV = VB / 8;
  constexpr int kVecV = kChunk * kVecPerRowV;
#pragma unroll
  for (int i = 0; i < (kVecV + 127) / 128; ++i) {
    const int idx = ptid + i * 128;
    if (kVecV % 128 == 0 || idx < kVecV) {
      const int r = idx / kVecPerRowV, c8 = (idx % kVecPerRowV) * 8;
      const bool ok = r < valid;
      const long long off = ok ? ((row0 + r) * H + h) * kHeadV + v0 + c8 : 0;
      cp_async_16(&raw.v[r][c8], p.v + off, ok);
    }
  }
}

template <int VB>
__device__ void producer(const KdaParams& p, SharedStorage<VB>& sm, int h, int v0, long long bos, int num_chunks,
                         int ptid) {
  constexpr int kThreads = (VB / 16 + kProducerWarps) * 32;
  const int warp = ptid >> 5, lane = ptid & 31;
  const int c = ptid;  // channel owned in the element-wise pass
  const float a = p.A_log != nullptr ? fast_exp(p.A_log[h]) : 1.0f;
  const float d = p.dt_bias != nullptr ? p.dt_bias[h * kHeadK + c] : 0.0f;
  const float lb = p.lower_bound;

  // beta of the next chunk is loaded one iteration ahead (a plain load; 16 values).
  auto load_beta = [&](int chunk) {
    const int r = chunk * kChunk + ptid;
    return (ptid < kChunk && r < p.seq_len) ? __bfloat162float(p.beta[(bos + r) * p.num_heads + h]) : 0.0f;
  };
  float beta_next = 0.0f;
  if (num_chunks > 0) {
    issue_chunk_load(p, sm.raw[0], bos, min(kChunk, p.seq_len), h, v0, ptid);
    cute::cp_async_fence();
    beta_next = load_beta(0);
  }
  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    const int s = chunk & 1;
    RawChunk<VB>& raw = sm.raw[chunk & 1];
    Stage<VB>& st = sm.stage[s];
    const long long row0 = bos + static_cast<long long>(chunk) * kChunk;
    const int valid = min(kChunk, p.seq_len - chunk * kChunk);  // seq_len holds this sequence's length here

    // Everyone finished reading the raw buffer we are about to refill.
    named_sync(kBarProducer, kProducerWarps * 32);
    const float beta_raw = beta_next;
    if (chunk + 1 < num_chunks) beta_next = load_beta(chunk + 1);
    if (chunk + 1 < num_chunks) {
      const int next_valid = min(kChunk, p.seq_len - (chunk + 1) * kChunk);
      issue_chunk_load(p, sm.raw[(chunk + 1) & 1], row0 + kChunk, next_valid, h, v0, ptid);
      cute::cp_async_fence();
      cute::cp_async_wait<1>();
    } else {
      cute::cp_async_fence();
      cute::cp_async_wait<0>();
    }
    named_sync(kBarProducer, kProducerWarps * 32);

    // Row norms of q and k (warp w: rows 4w..4w+3) and beta.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = warp * 4 + i;
      const __nv_bfloat162* qr = reinterpret_cast<const __nv_bfloat162*>(&raw.q[r][lane * 4]);
      const __nv_bfloat162* kr = reinterpret_cast<const __nv_bfloat162*>(&raw.k[r][lane * 4]);
      float2 q0 = __bfloat1622float2(qr[0]), q1 = __bfloat1622float2(qr[1]);
      float2 k0 = __bfloat1622float2(kr[0]), k1 = __bfloat1622float2(kr[1]);
      float sq = q0.x * q0.x + q0.y * q0.y + q1.x * q1.x + q1.y * q1.y;
      float sk = k0.x * k0.x + k0.y * k0.y + k1.x * k1.x + k1.y * k1.y;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        sq += __shfl_xor_sync(0xffffffffu, sq, off);
        sk += __shfl_xor_sync(0xffffffffu, sk, off);
      }
      if (lane == 0) {
        sm.inv_norm_q[r] = rsqrtf(sq + 1e-6f);
        sm.inv_norm_k[r] = rsqrtf(sk + 1e-6f);
      }
    }
    if (ptid < kChunk) sm.beta[ptid] = ptid < valid ? sigmoid(beta_raw) : 0.0f;
    named_sync(kBarProducer, kProducerWarps * 32);

    // The stage we write must have been released by the consumers.
    if (chunk >= kStages) named_sync(kBarEmpty0 + s, kThreads);

    // Element-wise pass: thread c owns key channel c for all 16 rows.
    float G[kChunk];
    float acc = 0.0f;
#pragma unroll
    for (int r = 0; r < kChunk; ++r) {
      const float x = a * (__bfloat162float(raw.g[r][c]) + d);
      const float gamma = r < valid ? lb * sigmoid(x) : 0.0f;
      acc += gamma;
      G[r] = acc;
    }
    const float g_last = acc;
    const float gamma_total = fast_exp(g_last);
#pragma unroll
    for (int r = 0; r < kChunk; ++r) {
      const float kh = __bfloat162float(raw.k[r][c]) * sm.inv_norm_k[r];
      const float qh = __bfloat162float(raw.q[r][c]) * sm.inv_norm_q[r] * p.scale;
      const float e = fast_exp(G[r]);
      const float ei = fast_exp(-G[r]);
      const float er = gamma_total * ei;  // e^{G_last - G}
      st.kd[r][c] = __float2bfloat16_rn(kh * e);
      st.qd[r][c] = __float2bfloat16_rn(qh * e);
      st.kr[r][c] = __float2bfloat16_rn(kh * er);
      sm.ki[r][c] = __float2bfloat16_rn(kh * ei);
    }
    st.gamma[c] = gamma_total;
    named_sync(kBarProducer, kProducerWarps * 32);

    const int gq = lane >> 2, tq = lane & 3;  // MMA fragment coordinates
    if (warp < 2) {
      // warp 0: L = Kd Ki^T, warp 1: M = Qd Ki^T (16x16, reduction over 128 channels)
      const bf16(*lhs)[kRowPad] = warp == 0 ? st.kd : st.qd;
      float acc2[2][4] = {};
#pragma unroll
      for (int ks = 0; ks < kHeadK / 16; ++ks) {
        uint32_t af[4];
        // A fragment: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
        ldsm_x4(&lhs[(lane & 7) + ((lane >> 3) & 1) * 8][ks * 16 + (lane >> 4) * 8], af[0], af[1], af[2], af[3]);
        uint32_t bf[4];
        // B fragments: matrices (tok 0-7, k 0-7), (tok 0-7, k 8-15), (tok 8-15, k 0-7), (tok 8-15, k 8-15)
        ldsm_x4(&sm.ki[(lane & 7) + (lane >> 4) * 8][ks * 16 + ((lane >> 3) & 1) * 8], bf[0], bf[1], bf[2], bf[3]);
        mma16816(acc2[0], af, bf[0], bf[1]);
        mma16816(acc2[1], af, bf[2], bf[3]);
      }
      if (warp == 0) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = gq + (e >> 1) * 8, j = nt * 8 + tq * 2 + (e & 1);
            sm.l[i][j] = i > j ? sm.beta[i] * acc2[nt][e] : 0.0f;
          }
        }
        __syncwarp();
        if (lane < kChunk) {
          // Forward substitution (fp32), right-looking so each step's updates are independent:
          // column `lane` of X = (I + L)^-1 diag(beta).
          const int col = lane;
          float x[kChunk];
#pragma unroll
          for (int i = 0; i < kChunk; ++i) x[i] = i == col ? sm.beta[i] : 0.0f;
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
#pragma unroll
            for (int i = j + 1; i < kChunk; ++i) x[i] -= sm.l[i][j] * x[j];
          }
#pragma unroll
          for (int i = 0; i < kChunk; ++i) st.t[i][col] = __float2bfloat16_rn(x[i]);
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int i = gq + hh * 8, j = nt * 8 + tq * 2;
            const float m0 = i >= j ? acc2[nt][hh * 2] : 0.0f;
            const float m1 = i >= j + 1 ? acc2[nt][hh * 2 + 1] : 0.0f;
            *reinterpret_cast<uint32_t*>(&st.m[i][j]) = pack_bf16(m0, m1);
          }
        }
      }
    } else {
      // warps 2-3: V chunk transposed into the stage (value column, token).
      for (int vc = ptid - 64; vc < VB; vc += 64) {
        uint32_t w[8];
#pragma unroll
        for (int r = 0; r < kChunk; r += 2) {
          __nv_bfloat162 pr;
          pr.x = raw.v[r][vc];
          pr.y = raw.v[r + 1][vc];
          w[r / 2] = *reinterpret_cast<uint32_t*>(&pr);
        }
        uint4* dst = reinterpret_cast<uint4*>(&st.vt[vc][0]);
        dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
        dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
      }
    }
    named_arrive(kBarFull0 + s, kThreads);
  }
}

// ---------------------------------------------------------------- consumer

template <int VB, int STATE_IN, int STATE_OUT>
__device__ void consumer(const KdaParams& p, SharedStorage<VB>& sm, int seq, int h, int v0, long long bos,
                         int seq_len, int num_chunks, int cw, int lane) {
  constexpr int kThreads = (VB / 16 + kProducerWarps) * 32;
  constexpr int kTiles = kHeadK / 8;  // 16 accumulator tiles of 16x8 across the key axis
  const int gq = lane >> 2, tq = lane & 3;
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
    const int s = chunk & 1;
    const Stage<VB>& st = sm.stage[s];
    named_sync(kBarFull0 + s, kThreads);

    // W^T = S Kd^T and O^T = S Qd^T (16 value rows x 16 tokens per warp).
    float W[2][4] = {}, O[2][4] = {};
#pragma unroll
    for (int ks = 0; ks < kHeadK / 16; ++ks) {
      uint32_t af[4] = {pack_bf16(S[2 * ks][0], S[2 * ks][1]), pack_bf16(S[2 * ks][2], S[2 * ks][3]),
                        pack_bf16(S[2 * ks + 1][0], S[2 * ks + 1][1]), pack_bf16(S[2 * ks + 1][2], S[2 * ks + 1][3])};
      const int brow = (lane & 7) + (lane >> 4) * 8, bcol = ks * 16 + ((lane >> 3) & 1) * 8;
      uint32_t kb[4], qb[4];
      ldsm_x4(&st.kd[brow][bcol], kb[0], kb[1], kb[2], kb[3]);
      ldsm_x4(&st.qd[brow][bcol], qb[0], qb[1], qb[2], qb[3]);
      mma16816(W[0], af, kb[0], kb[1]);
      mma16816(W[1], af, kb[2], kb[3]);
      mma16816(O[0], af, qb[0], qb[1]);
      mma16816(O[1], af, qb[2], qb[3]);
    }

    // X^T = V^T - W^T as an A fragment (value rows x tokens).
    uint32_t xf[4];
    {
      const int vr = cw * 16 + gq;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int nt = e >> 1, hh = e & 1;
        const __nv_bfloat162 vv = *reinterpret_cast<const __nv_bfloat162*>(&st.vt[vr + hh * 8][nt * 8 + tq * 2]);
        const float2 vf = __bfloat1622float2(vv);
        xf[e] = pack_bf16(vf.x - W[nt][hh * 2], vf.y - W[nt][hh * 2 + 1]);
      }
    }
    // U^T = X^T T^T: B[k][n] = T[n][k].
    float U[2][4] = {};
    {
      uint32_t tb[4];
      ldsm_x4(&st.t[(lane & 7) + (lane >> 4) * 8][((lane >> 3) & 1) * 8], tb[0], tb[1], tb[2], tb[3]);
      mma16816(U[0], xf, tb[0], tb[1]);
      mma16816(U[1], xf, tb[2], tb[3]);
    }
    const uint32_t uf[4] = {pack_bf16(U[0][0], U[0][1]), pack_bf16(U[0][2], U[0][3]), pack_bf16(U[1][0], U[1][1]),
                            pack_bf16(U[1][2], U[1][3])};
    // O^T += U^T M^T: B[k][n] = M[n][k].
    {
      uint32_t mb[4];
      ldsm_x4(&st.m[(lane & 7) + (lane >> 4) * 8][((lane >> 3) & 1) * 8], mb[0], mb[1], mb[2], mb[3]);
      mma16816(O[0], uf, mb[0], mb[1]);
      mma16816(O[1], uf, mb[2], mb[3]);
    }
    // S = S diag(Gamma) + U^T Kr: B[k = token][n = key] from Kr (transposed load).
#pragma unroll
    for (int n = 0; n < kTiles; n += 2) {
      uint32_t rb[4];
      ldsm_x4_t(&st.kr[(lane & 7) + ((lane >> 3) & 1) * 8][n * 8 + (lane >> 4) * 8], rb[0], rb[1], rb[2], rb[3]);
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
    // The stage is no longer needed: let the producer refill it.
    if (chunk + kStages < num_chunks) named_arrive(kBarEmpty0 + s, kThreads);

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
  constexpr int kSplits = kHeadV / VB;
  constexpr int kConsumerThreads = VB / 16 * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  SharedStorage<VB>& sm = *reinterpret_cast<SharedStorage<VB>*>(smem_raw);

  const int block = blockIdx.x;
  const int split = block % kSplits;
  const int h = (block / kSplits) % p.num_heads;
  const int seq = block / kSplits / p.num_heads;
  const int v0 = split * VB;
  long long bos, eos;
  sequence_bounds<VARLEN>(p, seq, bos, eos);
  const int seq_len = static_cast<int>(eos - bos);
  const int num_chunks = (seq_len + kChunk - 1) / kChunk;

  KdaParams local = p;
  local.seq_len = seq_len;  // the producer reads this sequence's length from here
  if (threadIdx.x >= kConsumerThreads) {
    producer<VB>(local, sm, h, v0, bos, num_chunks, threadIdx.x - kConsumerThreads);
  } else {
    consumer<VB, STATE_IN, STATE_OUT>(p, sm, seq, h, v0, bos, seq_len, num_chunks, threadIdx.x >> 5, threadIdx.x & 31);
  }
}

}  // namespace flash_kda
