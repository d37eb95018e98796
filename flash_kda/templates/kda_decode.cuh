// flash_kda: token-by-token KDA for short sequences: decode (1 token) and speculative verify (a few,
// with the state after every token stored in a pool slot).
//
// The work is memory-bound (each state is read once and written once, or once per token in verify),
// so the kernel is built for bandwidth: a warp owns kRowsPerWarp value rows of one (sequence, head)
// state, each lane four consecutive key channels of each row (16-byte fp32 / 8-byte bf16 accesses,
// 512 contiguous bytes per row and warp); the rows stay in registers across the sequence's tokens.
// Work comes in units of 16 rows (4 warps of a CTA): 8 per (sequence, head), so 256 CTAs even at
// N = 1, H = 32; larger batches run a persistent grid that prefetches each warp's next unit.
//
// Per token t (docs/algorithm.md, section 1), with the row's state s = S_row * alpha_t:
//   sk = s . k^,  sq = scale s . q^    (one butterfly reduction for all rows of the warp)
//   u  = beta (v_row - sk),   S_row = s + u k^,   o_row = sq + u (scale k^ . q^).
// Every warp recomputes the token's norms and gate for its own channels (L2-resident inputs,
// far fewer bytes than the state it streams).
#pragma once

#include "kda_arch.cuh"
#include "kda_gate.cuh"
#include "kda_params.cuh"

namespace flash_kda {

struct DecodeConfig {
  static constexpr int kRowsPerWarp = 4;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerCta = kRowsPerWarp * kWarps;  // one work unit: 16 value rows of one (sequence, head)
  static constexpr int kUnitsPerHead = kHeadV / kRowsPerCta;
  static constexpr int kCtasPerSm = 6;  // __launch_bounds__ (spec.py): the host sizes the persistent grid with it
};

// One work unit: where a warp's rows of one (sequence, head) live and what its sequence is.
struct DecodeUnit {
  int seq, h, row0;
  long long bos, eos;
  StatePlan plan;
};

template <bool VARLEN>
__device__ __forceinline__ DecodeUnit decode_unit(const KdaParams& p, int unit, int warp) {
  using Cfg = DecodeConfig;
  DecodeUnit u;
  u.h = (unit / Cfg::kUnitsPerHead) % p.num_heads;
  u.seq = unit / Cfg::kUnitsPerHead / p.num_heads;
  u.row0 = (unit % Cfg::kUnitsPerHead) * Cfg::kRowsPerCta + warp * Cfg::kRowsPerWarp;
  u.plan = plan_state(p, u.seq, u.h);
  sequence_bounds<VARLEN>(p, u.seq, u.bos, u.eos);
  return u;
}

template <int STATE_IN>
__device__ __forceinline__ void load_rows(const KdaParams& p, const DecodeUnit& u, int c0,
                                          float (&S)[DecodeConfig::kRowsPerWarp][4]) {
#pragma unroll
  for (int r = 0; r < DecodeConfig::kRowsPerWarp; ++r) {
    float4 row = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if constexpr (STATE_IN != kStateNone) {
      if (!u.plan.skip && u.plan.read_offset >= 0) {
        row = load_state4<STATE_IN>(p.initial_state, u.plan.read_offset + static_cast<long long>(u.row0 + r) * kHeadK + c0);
      }
    }
    S[r][0] = row.x, S[r][1] = row.y, S[r][2] = row.z, S[r][3] = row.w;
  }
}

// Every token of one unit: the rows in S advance through the sequence, outputs and states are stored.
template <int STATE_OUT, bool VARLEN>
__device__ __forceinline__ void decode_tokens(const KdaParams& p, const DecodeUnit& u, int lane,
                                              float (&S)[DecodeConfig::kRowsPerWarp][4]) {
  constexpr int R = DecodeConfig::kRowsPerWarp;
  static_assert(R == 4, "v and out move as 4 bf16 (8 bytes) per warp");
  const int c0 = lane * 4;
  const int seq_len = static_cast<int>(u.eos - u.bos);
  const bool per_token = (p.features & kFeaturePerToken) != 0;
  const BoundedGate gate(p, u.h, c0);
  const TensorStrides sq = input_strides(p, kInputQ, kHeadK), sk = input_strides(p, kInputK, kHeadK);
  const TensorStrides sg = input_strides(p, kInputG, kHeadK), sv = input_strides(p, kInputV, kHeadV);
  const TensorStrides sb = input_strides(p, kInputBeta, 1);
  const bf16* q_head = p.q + token_offset(sq, VARLEN, u.seq, u.bos, 0, u.h) + c0;
  const bf16* k_head = p.k + token_offset(sk, VARLEN, u.seq, u.bos, 0, u.h) + c0;
  const bf16* g_head = p.g + token_offset(sg, VARLEN, u.seq, u.bos, 0, u.h) + c0;
  const bf16* v_head = p.v + token_offset(sv, VARLEN, u.seq, u.bos, 0, u.h) + u.row0;
  const bf16* beta_head = p.beta + token_offset(sb, VARLEN, u.seq, u.bos, 0, u.h);

  for (int t = 0; t < seq_len; ++t) {
    const uint2 q_raw = *reinterpret_cast<const uint2*>(q_head + t * sq.token);
    const uint2 k_raw = *reinterpret_cast<const uint2*>(k_head + t * sk.token);
    const uint2 g_raw = *reinterpret_cast<const uint2*>(g_head + t * sg.token);
    const uint2 v_raw = *reinterpret_cast<const uint2*>(v_head + t * sv.token);  // this warp's 4 values
    const float beta = sigmoid(__bfloat162float(beta_head[t * sb.token]));
    const float2 q01 = unpack_bf16(q_raw.x), q23 = unpack_bf16(q_raw.y);
    const float2 k01 = unpack_bf16(k_raw.x), k23 = unpack_bf16(k_raw.y);
    const float2 g01 = unpack_bf16(g_raw.x), g23 = unpack_bf16(g_raw.y);
    const float2 v01 = unpack_bf16(v_raw.x), v23 = unpack_bf16(v_raw.y);
    const float q[4] = {q01.x, q01.y, q23.x, q23.y}, k[4] = {k01.x, k01.y, k23.x, k23.y};
    const float g[4] = {g01.x, g01.y, g23.x, g23.y}, v[R] = {v01.x, v01.y, v23.x, v23.y};

    float q_sq = 0.0f, k_sq = 0.0f, qk = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      q_sq = fmaf(q[j], q[j], q_sq);
      k_sq = fmaf(k[j], k[j], k_sq);
      qk = fmaf(q[j], k[j], qk);
    }
    q_sq = warp_sum(q_sq);
    k_sq = warp_sum(k_sq);
    qk = warp_sum(qk);
    const float q_scale = rsqrtf(q_sq + 1e-6f) * p.scale;  // q^ = q q_scale / scale, scale folded in
    const float k_scale = rsqrtf(k_sq + 1e-6f);
    const float qk_norm = qk * q_scale * k_scale;          // scale k^ . q^
    float k_norm[4], q_norm[4], decay[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      k_norm[j] = k[j] * k_scale;
      q_norm[j] = q[j] * q_scale;
      decay[j] = ex2(gate.accumulate(0.0f, g[j], j));
    }

    float sk_part[R], sq_part[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      sk_part[r] = 0.0f, sq_part[r] = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        S[r][j] *= decay[j];
        sk_part[r] = fmaf(S[r][j], k_norm[j], sk_part[r]);
        sq_part[r] = fmaf(S[r][j], q_norm[j], sq_part[r]);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {  // all 2R sums at once: independent shuffles in flight
#pragma unroll
      for (int r = 0; r < R; ++r) {
        sk_part[r] += __shfl_xor_sync(kFullMask, sk_part[r], off);
        sq_part[r] += __shfl_xor_sync(kFullMask, sq_part[r], off);
      }
    }
    float o[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float upd = beta * (v[r] - sk_part[r]);
#pragma unroll
      for (int j = 0; j < 4; ++j) S[r][j] = fmaf(upd, k_norm[j], S[r][j]);
      o[r] = fmaf(upd, qk_norm, sq_part[r]);
    }
    if (lane == 0) {
      bf16* out = p.out + ((u.bos + t) * p.num_heads + u.h) * kHeadV + u.row0;
      *reinterpret_cast<uint2*>(out) = make_uint2(pack_bf16(o[0], o[1]), pack_bf16(o[2], o[3]));
    }
    if constexpr (STATE_OUT != kStateNone) {
      if (per_token) {
        const long long offset = token_state_offset(p, u.seq, u.h, t);
        if (offset >= 0) {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            store_state4<STATE_OUT>(p.final_state, offset + static_cast<long long>(u.row0 + r) * kHeadK + c0, S[r]);
          }
        }
      }
    }
  }

  if constexpr (STATE_OUT != kStateNone) {
    if (!per_token) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        store_state4<STATE_OUT>(p.final_state, u.plan.write_offset + static_cast<long long>(u.row0 + r) * kHeadK + c0,
                                S[r]);
      }
    }
  }
}

// A persistent grid (at most kCtasPerSm CTAs per SM) walks the work units; each warp loads the
// state rows of its next unit before it works on the current one, so that loads are always in
// flight while the previous rows are computed and stored.
template <int STATE_IN, int STATE_OUT, bool VARLEN>
__device__ __forceinline__ void kda_decode(const KdaParams& p) {
  using Cfg = DecodeConfig;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int units = p.num_seqs * p.num_heads * Cfg::kUnitsPerHead;
  int unit = blockIdx.x;
  if (unit >= units) return;
  DecodeUnit current = decode_unit<VARLEN>(p, unit, warp);
  float S[Cfg::kRowsPerWarp][4];
  load_rows<STATE_IN>(p, current, lane * 4, S);
  while (true) {
    const int next_unit = unit + gridDim.x;
    const bool has_next = next_unit < units;
    DecodeUnit next;
    float S_next[Cfg::kRowsPerWarp][4];
    if (has_next) {
      next = decode_unit<VARLEN>(p, next_unit, warp);
      load_rows<STATE_IN>(p, next, lane * 4, S_next);
    }
    // an invalid pool slot skips the unit: no state read or written, no output row written
    if (!current.plan.skip) decode_tokens<STATE_OUT, VARLEN>(p, current, lane, S);
    if (!has_next) break;
    unit = next_unit;
    current = next;
#pragma unroll
    for (int r = 0; r < Cfg::kRowsPerWarp; ++r) {
#pragma unroll
      for (int j = 0; j < 4; ++j) S[r][j] = S_next[r][j];
    }
  }
}

}  // namespace flash_kda
