// flash_kda: token-by-token KDA for short sequences: decode (1 token) and speculative verify (a few,
// with the state after every token stored in a pool slot).
//
// The work is memory-bound (each state is read once and written once, or once per token in verify),
// so the kernel is built for bandwidth: a warp owns kRowsPerWarp value rows of one (sequence, head)
// state (DecodeConfig), each lane four consecutive key channels of each row (16-byte fp32 / 8-byte
// bf16 accesses, contiguous rows per warp); the rows stay in registers across the sequence's tokens.
// A warp walks its rows in groups of 4 (loading the next group while computing one); small batches
// cut each head into more CTAs (up to 8, one group per warp: 256 CTAs even at N = 1, H = 32) and
// large ones into fewer, so that the per-token work of a warp is shared by more rows.
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
  static constexpr int kRows = 4;       // value rows a warp holds at once (a group)
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMaxCtasPerHead = kHeadV / (kRows * kWarps);  // 8: one group per warp
  // __launch_bounds__ (spec.py): the grouped build holds a token's quantities across row groups (80
  // registers a thread, no spills); the one-group build (8 CTAs of a head) fits in 72.
  template <bool GROUPED>
  static constexpr int kCtasPerSm = GROUPED ? 6 : 7;
};

// One token's quantities a warp needs, whatever rows it updates (docs/algorithm.md, section 1):
// its lane's 4 channels of k^, scale q^ and the decay; beta; scale k^ . q^.
struct TokenPrep {
  float k_norm[4], q_norm[4], decay[4];
  float beta, qk_norm;
};

struct TokenRaw {
  uint2 q, k, g;
  bf16 beta;
};

__device__ __forceinline__ TokenPrep prepare_token(const KdaParams& p, const TokenRaw& in, const BoundedGate& gate) {
  TokenPrep t;
  const float2 q01 = unpack_bf16(in.q.x), q23 = unpack_bf16(in.q.y);
  const float2 k01 = unpack_bf16(in.k.x), k23 = unpack_bf16(in.k.y);
  const float2 g01 = unpack_bf16(in.g.x), g23 = unpack_bf16(in.g.y);
  const float q[4] = {q01.x, q01.y, q23.x, q23.y}, k[4] = {k01.x, k01.y, k23.x, k23.y};
  const float g[4] = {g01.x, g01.y, g23.x, g23.y};
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
  const float q_scale = rsqrtf(q_sq + 1e-6f) * p.scale;  // scale folded into q^
  const float k_scale = rsqrtf(k_sq + 1e-6f);
  t.qk_norm = qk * q_scale * k_scale;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    t.k_norm[j] = k[j] * k_scale;
    t.q_norm[j] = q[j] * q_scale;
    t.decay[j] = ex2(gate.accumulate(0.0f, g[j], j));
  }
  t.beta = sigmoid(__bfloat162float(in.beta));
  return t;
}

// One token on a group of rows: S = S diag(decay); u = beta (v - S k^); S += u k^T; o = S q^ (scaled).
// Returns the 4 outputs (every lane holds them).
__device__ __forceinline__ float4 apply_token(const TokenPrep& t, uint2 v_raw, float (&S)[DecodeConfig::kRows][4]) {
  constexpr int R = DecodeConfig::kRows;
  const float2 v01 = unpack_bf16(v_raw.x), v23 = unpack_bf16(v_raw.y);
  const float v[R] = {v01.x, v01.y, v23.x, v23.y};
  float sk[R], sq[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    sk[r] = 0.0f, sq[r] = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      S[r][j] *= t.decay[j];
      sk[r] = fmaf(S[r][j], t.k_norm[j], sk[r]);
      sq[r] = fmaf(S[r][j], t.q_norm[j], sq[r]);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {  // all 2R sums at once: independent shuffles in flight
#pragma unroll
    for (int r = 0; r < R; ++r) {
      sk[r] += __shfl_xor_sync(kFullMask, sk[r], off);
      sq[r] += __shfl_xor_sync(kFullMask, sq[r], off);
    }
  }
  float o[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float update = t.beta * (v[r] - sk[r]);
#pragma unroll
    for (int j = 0; j < 4; ++j) S[r][j] = fmaf(update, t.k_norm[j], S[r][j]);
    o[r] = fmaf(update, t.qk_norm, sq[r]);
  }
  return make_float4(o[0], o[1], o[2], o[3]);
}

// A CTA owns a slice of 128 / ctas_per_head value rows of one (sequence, head) (the host picks
// ctas_per_head in {1, 2, 4, 8} and launches N * H * ctas_per_head CTAs); each warp walks its
// share in groups of 4 rows (prefetching the next group into the L2 while it computes the current one),
// so that the per-token work (loads, norms, gate) is done once per warp and shared by all its groups.
// GROUPED: a build for 1, 2 or 4 CTAs per head (warps walk several groups); otherwise 8 CTAs per
// head and one group per warp (more CTAs resident: small batches and multi-token steps).
template <int STATE_IN, int STATE_OUT, bool VARLEN, bool GROUPED>
__device__ __forceinline__ void kda_decode(const KdaParams& p) {
  using Cfg = DecodeConfig;
  constexpr int R = Cfg::kRows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ctas_per_head = GROUPED ? gridDim.x / (p.num_seqs * p.num_heads) : Cfg::kMaxCtasPerHead;
  const int groups = GROUPED ? Cfg::kMaxCtasPerHead / ctas_per_head : 1;  // groups of R rows per warp
  const int block = blockIdx.x;
  const int h = (block / ctas_per_head) % p.num_heads;
  const int seq = block / ctas_per_head / p.num_heads;
  const int row0 = ((block % ctas_per_head) * Cfg::kWarps + warp) * groups * R;  // this warp's first value row
  const int c0 = lane * 4;                                                        // this lane's first key channel

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
  auto load_token = [&](long long t) -> TokenRaw {
    return {*reinterpret_cast<const uint2*>(q_head + t * sq.token), *reinterpret_cast<const uint2*>(k_head + t * sk.token),
            *reinterpret_cast<const uint2*>(g_head + t * sg.token), beta_head[t * sb.token]};
  };
  // Ask the L2 for a group's rows ahead of their loads (no registers held, unlike a register prefetch).
  auto prefetch_group = [&](int group) {
    if constexpr (STATE_IN != kStateNone) {
      if (plan.read_offset >= 0) {
        constexpr int kBytes = STATE_IN == kStateFP32 ? 4 : 2;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const char* row = static_cast<const char*>(p.initial_state) +
                            (plan.read_offset + static_cast<long long>(row0 + group * R + r) * kHeadK + c0) * kBytes;
          asm volatile("prefetch.global.L2 [%0];" :: "l"(row));
        }
      }
    }
  };
  auto load_group = [&](int group, float (&rows)[R][4]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float4 row = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if constexpr (STATE_IN != kStateNone) {
        if (plan.read_offset >= 0) {
          row = load_state4<STATE_IN>(p.initial_state,
                                      plan.read_offset + static_cast<long long>(row0 + group * R + r) * kHeadK + c0);
        }
      }
      rows[r][0] = row.x, rows[r][1] = row.y, rows[r][2] = row.z, rows[r][3] = row.w;
    }
  };

  float S[R][4];
  load_group(0, S);
  const TokenRaw first = seq_len > 0 ? load_token(0) : TokenRaw{};
  const BoundedGate gate(p, gate_raw);
  TokenPrep first_prep;  // every group's token 0 (all of decode), kept across groups by the grouped build
  if constexpr (GROUPED) first_prep = prepare_token(p, first, gate);
  const bool per_token = (p.features & kFeaturePerToken) != 0;

  for (int group = 0; group < groups; ++group) {
    if (group > 0) load_group(group, S);
    if (group + 1 < groups) prefetch_group(group + 1);
    const int rows0 = row0 + group * R;
    TokenRaw upcoming = seq_len > 1 ? load_token(1) : TokenRaw{};  // one token ahead (verify)
    for (int t = 0; t < seq_len; ++t) {
      TokenPrep prep = GROUPED ? first_prep : TokenPrep{};
      if (!GROUPED && t == 0) prep = prepare_token(p, first, gate);
      if (t > 0) {
        prep = prepare_token(p, upcoming, gate);
        if (t + 1 < seq_len) upcoming = load_token(t + 1);
      }
      const float4 o = apply_token(prep, *reinterpret_cast<const uint2*>(v_head + t * sv.token + group * R), S);
      if (lane == 0) {
        *reinterpret_cast<uint2*>(p.out + ((bos + t) * p.num_heads + h) * kHeadV + rows0) =
            make_uint2(pack_bf16(o.x, o.y), pack_bf16(o.z, o.w));
      }
      if constexpr (STATE_OUT != kStateNone) {
        if (per_token) {
          const long long offset = token_state_offset(p, seq, h, t);
          if (offset >= 0) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
              store_state4<STATE_OUT>(p.final_state, offset + static_cast<long long>(rows0 + r) * kHeadK + c0, S[r]);
            }
          }
        }
      }
    }
    if constexpr (STATE_OUT != kStateNone) {
      if (!per_token) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          store_state4<STATE_OUT>(p.final_state, plan.write_offset + static_cast<long long>(rows0 + r) * kHeadK + c0,
                                  S[r]);
        }
      }
    }
  }
}

}  // namespace flash_kda
