// flash_kda: token-by-token KDA for short sequences: decode (1 token) and speculative verify (a few,
// with the state after every token stored in a pool slot).
//
// The work is memory-bound (each state is read once and written once, or once per token in verify),
// so the kernel is built for bandwidth: a warp owns kRowsPerWarp value rows of one (sequence, head)
// state (DecodeConfig), each lane four consecutive key channels of each row (16-byte fp32 / 8-byte
// bf16 accesses, contiguous rows per warp); the rows stay in registers across the sequence's tokens.
// Small CTAs (4 warps, 16 rows) give 8 CTAs per (sequence, head): 256 CTAs even at N = 1, H = 32,
// and 8 resident CTAs per SM keep enough state loads in flight for larger batches.
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

// Rows per warp: 4 when a state is fp32 (16-byte accesses per lane and row), 8 when states are bf16
// or absent (8-byte accesses, twice the rows: the same bytes in flight per lane, and the per-token
// work of a warp shared by twice the rows).
template <int STATE_IN, int STATE_OUT>
struct DecodeConfig {
  static constexpr int kRowsPerWarp = (STATE_IN == kStateFP32 || STATE_OUT == kStateFP32) ? 4 : 8;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerCta = kRowsPerWarp * kWarps;
  static constexpr int kCtasPerHead = kHeadV / kRowsPerCta;  // grid: N * H * kCtasPerHead
  static constexpr int kCtasPerSm = kRowsPerWarp == 4 ? 8 : 5;  // __launch_bounds__ (spec.py): no spills
};

// The raw inputs of one token for one warp: its lane's 4 channels of q, k, g; the warp's values of
// v (4 bf16 per uint2); beta.
template <int R>
struct TokenInputs {
  uint2 q, k, g, v[R / 4];
  bf16 beta;
};

template <int STATE_IN, int STATE_OUT, bool VARLEN>
__device__ __forceinline__ void kda_decode(const KdaParams& p) {
  using Cfg = DecodeConfig<STATE_IN, STATE_OUT>;
  constexpr int R = Cfg::kRowsPerWarp;
  static_assert(R % 4 == 0, "v and out move as groups of 4 bf16 (8 bytes)");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int block = blockIdx.x;
  const int h = (block / Cfg::kCtasPerHead) % p.num_heads;
  const int seq = block / Cfg::kCtasPerHead / p.num_heads;
  const int row0 = (block % Cfg::kCtasPerHead) * Cfg::kRowsPerCta + warp * R;  // this warp's first value row
  const int c0 = lane * 4;                                                       // this lane's first key channel

  // Global loads in two waves, so that a CTA waits for two round trips, not one per dependency:
  // first everything that depends on no other load (gate parameters, sequence bounds, the slot),
  // then the state rows and the first token's inputs, which need the slot and the bounds.
  const BoundedGate::Raw gate_raw = BoundedGate::load(p, h, c0);
  long long bos, eos;
  sequence_bounds<VARLEN>(p, seq, bos, eos);
  const StatePlan plan = plan_state(p, seq, h);
  if (plan.skip) return;  // an invalid pool slot: no state read or written, no output row written
  const int seq_len = static_cast<int>(eos - bos);

  const TensorStrides sq = input_strides(p, kInputQ, kHeadK), sk = input_strides(p, kInputK, kHeadK);
  const TensorStrides sg = input_strides(p, kInputG, kHeadK), sv = input_strides(p, kInputV, kHeadV);
  const TensorStrides sb = input_strides(p, kInputBeta, 1);
  const bf16* q_head = p.q + token_offset(sq, VARLEN, seq, bos, 0, h) + c0;
  const bf16* k_head = p.k + token_offset(sk, VARLEN, seq, bos, 0, h) + c0;
  const bf16* g_head = p.g + token_offset(sg, VARLEN, seq, bos, 0, h) + c0;
  const bf16* v_head = p.v + token_offset(sv, VARLEN, seq, bos, 0, h) + row0;
  const bf16* beta_head = p.beta + token_offset(sb, VARLEN, seq, bos, 0, h);
  auto load_token = [&](long long t) {
    TokenInputs<R> in;
    in.q = *reinterpret_cast<const uint2*>(q_head + t * sq.token);
    in.k = *reinterpret_cast<const uint2*>(k_head + t * sk.token);
    in.g = *reinterpret_cast<const uint2*>(g_head + t * sg.token);
#pragma unroll
    for (int i = 0; i < R / 4; ++i) in.v[i] = *reinterpret_cast<const uint2*>(v_head + t * sv.token + 4 * i);
    in.beta = beta_head[t * sb.token];
    return in;
  };

  float S[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float4 row = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if constexpr (STATE_IN != kStateNone) {
      if (plan.read_offset >= 0) {
        row = load_state4<STATE_IN>(p.initial_state, plan.read_offset + static_cast<long long>(row0 + r) * kHeadK + c0);
      }
    }
    S[r][0] = row.x, S[r][1] = row.y, S[r][2] = row.z, S[r][3] = row.w;
  }
  TokenInputs<R> next = seq_len > 0 ? load_token(0) : TokenInputs<R>{};
  const BoundedGate gate(p, gate_raw);
  const bool per_token = (p.features & kFeaturePerToken) != 0;

  for (int t = 0; t < seq_len; ++t) {
    const TokenInputs<R> in = next;
    if (t + 1 < seq_len) next = load_token(t + 1);  // one token ahead (verify, and mis-hinted long sequences)
    const float beta = sigmoid(__bfloat162float(in.beta));
    const float2 q01 = unpack_bf16(in.q.x), q23 = unpack_bf16(in.q.y);
    const float2 k01 = unpack_bf16(in.k.x), k23 = unpack_bf16(in.k.y);
    const float2 g01 = unpack_bf16(in.g.x), g23 = unpack_bf16(in.g.y);
    const float q[4] = {q01.x, q01.y, q23.x, q23.y}, k[4] = {k01.x, k01.y, k23.x, k23.y};
    const float g[4] = {g01.x, g01.y, g23.x, g23.y};
    float v[R];
#pragma unroll
    for (int i = 0; i < R / 4; ++i) {
      const float2 lo = unpack_bf16(in.v[i].x), hi = unpack_bf16(in.v[i].y);
      v[4 * i] = lo.x, v[4 * i + 1] = lo.y, v[4 * i + 2] = hi.x, v[4 * i + 3] = hi.y;
    }

    float q_sq = 0.0f, k_sq = 0.0f, qk = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      q_sq = fmaf(q[j], q[j], q_sq);
      k_sq = fmaf(k[j], k[j], k_sq);
      qk = fmaf(q[j], k[j], qk);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {  // the three sums at once
      q_sq += __shfl_xor_sync(kFullMask, q_sq, off);
      k_sq += __shfl_xor_sync(kFullMask, k_sq, off);
      qk += __shfl_xor_sync(kFullMask, qk, off);
    }
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
      const float update = beta * (v[r] - sk_part[r]);
#pragma unroll
      for (int j = 0; j < 4; ++j) S[r][j] = fmaf(update, k_norm[j], S[r][j]);
      o[r] = fmaf(update, qk_norm, sq_part[r]);
    }
    if (lane < R / 4) {  // every lane holds every sum: lane i writes values 4i .. 4i + 3
      uint2 packed = make_uint2(0u, 0u);
#pragma unroll
      for (int i = 0; i < R / 4; ++i) {  // registers are not indexable by lane: pick with a compare
        if (lane == i) packed = make_uint2(pack_bf16(o[4 * i], o[4 * i + 1]), pack_bf16(o[4 * i + 2], o[4 * i + 3]));
      }
      *reinterpret_cast<uint2*>(p.out + ((bos + t) * p.num_heads + h) * kHeadV + row0 + 4 * lane) = packed;
    }
    if constexpr (STATE_OUT != kStateNone) {
      if (per_token) {
        const long long offset = token_state_offset(p, seq, h, t);
        if (offset >= 0) {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            store_state4<STATE_OUT>(p.final_state, offset + static_cast<long long>(row0 + r) * kHeadK + c0, S[r]);
          }
        }
      }
    }
  }

  if constexpr (STATE_OUT != kStateNone) {
    if (!per_token) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        store_state4<STATE_OUT>(p.final_state, plan.write_offset + static_cast<long long>(row0 + r) * kHeadK + c0, S[r]);
      }
    }
  }
}

}  // namespace flash_kda
