// flash_kda: token-by-token KDA for short sequences: decode (1 token) and speculative verify (a few,
// with the state after every token stored in a pool slot).
//
// The work is memory-bound (each state is read once and written once, or once per token in verify),
// so the kernel is built for bandwidth: a warp owns groups of kRows value rows of one (sequence, head)
// state (DecodeConfig), each lane four consecutive key channels of each row (16-byte fp32 / 8-byte
// bf16 accesses, contiguous rows per warp). Small batches and most fp32 steps cut each head into 8 CTAs
// (the one-group build: one group per warp, its rows in registers across the tokens: 256 CTAs even at
// N = 1, H = 32); larger batches into 2 or 4, whose warps hold 4 or 2 groups in shared memory
// so that a token's preparation is shared by all of a warp's rows: the streamed build for one-token
// steps (groups outside), the token-outer build for several tokens (tokens outside, each token prepared
// once per CTA: SharedToken). The host picks (api._decode_ctas_per_head).
//
// Per token t (docs/algorithm.md, section 1), with the row's state s = S_row * alpha_t:
//   sk = s . k^,  sq = scale s . q^    (one reduce-scatter over the warp for all rows: warp_reduce_scatter)
//   u  = beta (v_row - sk),   S_row = s + u k^,   o_row = sq + u (scale k^ . q^).
// The one-group and streamed builds' warps each work out the token's norms and gate for their own channels
// (L2-resident inputs, far fewer bytes than the state they stream).
#pragma once

#include "kda_arch.cuh"
#include "kda_gate.cuh"
#include "kda_params.cuh"

namespace flash_kda {

// The builds of the token-by-token kernel (spec.py DECODE_BUILDS; api._decode_ctas_per_head picks one).
constexpr int kOneGroup = 0;    // 8 CTAs a head, one group of rows per warp, in registers across the tokens
constexpr int kStreamed = 1;    // 2 or 4 CTAs a head, one-token steps: groups outside, rows staged as stored
constexpr int kTokenOuter = 2;  // 2 or 4 CTAs a head, multi-token steps: tokens outside, rows kept in fp32

struct DecodeConfig {
  static constexpr int kRows = 4;       // value rows a warp holds at once (a group)
  static constexpr int kMaxGroups = 4;  // grouped builds: row groups a warp keeps in shared memory
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMaxCtasPerHead = kHeadV / (kRows * kWarps);  // 8: one group per warp
  // The CTAs an SM each build is compiled for (__launch_bounds__) are set per build and arch in
  // spec.py (DECODE_BUILDS, Arch.streamed_decode_ctas_per_sm), as measured on the H100.
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

// The one-group build's next token as it lands from cp.async: each lane's 4 channels of q, k, g; the
// values of the warp's row group, double-buffered.
struct TokenStage {
  uint2 q[32], k[32], g[32];
  uint2 v[2][DecodeConfig::kMaxGroups];
};

// What a token's preparation needs the whole warp for (the norms' sums) or takes once per token: the scales
// of q^ (with the attention scale folded in) and k^, scale k^ . q^, and beta.
struct TokenScales {
  float q_scale, k_scale, qk_norm, beta;
};

__device__ __forceinline__ TokenScales token_scales(const KdaParams& p, const TokenRaw& in) {
  const float2 q01 = unpack_bf16(in.q.x), q23 = unpack_bf16(in.q.y);
  const float2 k01 = unpack_bf16(in.k.x), k23 = unpack_bf16(in.k.y);
  const float q[4] = {q01.x, q01.y, q23.x, q23.y}, k[4] = {k01.x, k01.y, k23.x, k23.y};
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
  TokenScales s;
  s.q_scale = rsqrtf(q_sq + 1e-6f) * p.scale;  // scale folded into q^
  s.k_scale = rsqrtf(k_sq + 1e-6f);
  s.qk_norm = qk * s.q_scale * s.k_scale;
  s.beta = sigmoid(__bfloat162float(in.beta));
  return s;
}

// This lane's decays of the token: the gate on its 4 channels.
template <class Gate>
__device__ __forceinline__ float4 token_decays(const TokenRaw& in, const Gate& gate) {
  const float2 g01 = unpack_bf16(in.g.x), g23 = unpack_bf16(in.g.y);
  return make_float4(ex2(gate.accumulate(0.0f, g01.x, 0)), ex2(gate.accumulate(0.0f, g01.y, 1)),
                     ex2(gate.accumulate(0.0f, g23.x, 2)), ex2(gate.accumulate(0.0f, g23.y, 3)));
}

// The token as this lane uses it, from its raw q and k, its decays and the token's scales.
__device__ __forceinline__ TokenPrep lane_token(uint2 q_raw, uint2 k_raw, float4 decays, const TokenScales& s) {
  const float2 q01 = unpack_bf16(q_raw.x), q23 = unpack_bf16(q_raw.y);
  const float2 k01 = unpack_bf16(k_raw.x), k23 = unpack_bf16(k_raw.y);
  const float q[4] = {q01.x, q01.y, q23.x, q23.y}, k[4] = {k01.x, k01.y, k23.x, k23.y};
  const float decay[4] = {decays.x, decays.y, decays.z, decays.w};
  TokenPrep t;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    t.k_norm[j] = k[j] * s.k_scale;
    t.q_norm[j] = q[j] * s.q_scale;
    t.decay[j] = decay[j];
  }
  t.qk_norm = s.qk_norm;
  t.beta = s.beta;
  return t;
}

template <class Gate>
__device__ __forceinline__ TokenPrep prepare_token(const KdaParams& p, const TokenRaw& in, const Gate& gate) {
  return lane_token(in.q, in.k, token_decays(in, gate), token_scales(p, in));
}

// The token-outer build's tokens, prepared once per CTA: in rounds of up to kRoundTokens tokens, warp w
// prepares the round's token w into shared memory, and every warp reads each token from there (kda_decode,
// benchmarks/NOTES.md, round 21). Each lane reads what the same lane of the preparing warp wrote: its 4
// channels.
struct SharedToken {
  static constexpr int kRoundTokens = DecodeConfig::kWarps;  // one token per warp
  uint2 q[32], k[32];  // as loaded
  float4 decays[32];
  TokenScales scales;
  uint2 values[DecodeConfig::kWarps * DecodeConfig::kMaxGroups];  // 4 values of each of the CTA's row groups
};

// The lanes that write a token's outputs (see apply_token), and the row each writes.
__device__ __forceinline__ bool writes_output(int lane) { return (lane & 19) == 16; }  // lanes 16, 20, 24, 28
__device__ __forceinline__ int output_row(int lane) { return (lane >> 2) & 3; }

// One token on a group of rows: S = S diag(decay); u = beta (v - S k^); S += u k^T; o = S q^ (scaled).
// Returns o of row output_row(lane) on the lanes where writes_output(lane). 14 shuffles in all.
__device__ __forceinline__ float apply_token(const TokenPrep& t, uint2 v_raw, float (&S)[DecodeConfig::kRows][4],
                                             int lane) {
  constexpr int R = DecodeConfig::kRows;
  const float2 v01 = unpack_bf16(v_raw.x), v23 = unpack_bf16(v_raw.y);
  const float v[R] = {v01.x, v01.y, v23.x, v23.y};
  float partial[2 * R];  // this lane's channels of sk (rows 0..3), then of sq
#pragma unroll
  for (int r = 0; r < R; ++r) {
    partial[r] = 0.0f, partial[R + r] = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      S[r][j] *= t.decay[j];
      partial[r] = fmaf(S[r][j], t.k_norm[j], partial[r]);
      partial[R + r] = fmaf(S[r][j], t.q_norm[j], partial[R + r]);
    }
  }
  // 9 shuffles in place of 8 butterflies' 40 (kda_arch.cuh): lane L ends with value (L >> 2) & 7, i.e.
  // sk of row (lane >> 2) & 3 in lanes 0-15, sq in 16-31
  const float sum = warp_reduce_scatter(partial, lane);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float update = t.beta * (v[r] - __shfl_sync(kFullMask, sum, 4 * r));
#pragma unroll
    for (int j = 0; j < 4; ++j) S[r][j] = fmaf(update, t.k_norm[j], S[r][j]);
  }
  // a writing lane's row: its sk sits 16 lanes down, its value is one half of v_raw's words
  const int row = output_row(lane);
  const uint32_t v_word = row & 2 ? v_raw.y : v_raw.x;
  const float own_v = __uint_as_float(row & 1 ? v_word & 0xffff0000u : v_word << 16);
  const float own_sk = __shfl_sync(kFullMask, sum, lane & 15);
  return fmaf(t.beta * (own_v - own_sk), t.qk_norm, sum);
}

struct DecodeCta {
  int slice, head, seq, ctas_per_head;
};

// Which slice of which (sequence, head) this CTA owns. The grid is (ctas_per_head, H, N), so that no
// integer division (about 20 instructions each, three of them chained) stands between a CTA's start and
// its first loads (benchmarks/NOTES.md, round 18). Two launches come otherwise (api.fwd), both with
// gridDim.y = 1, which the common grid's start tests for no more than it did before them:
// - more sequences or heads than a grid dimension holds (65535): flattened, (sequence, head, slice) in x,
//   divided out;
// - a launch of several waves whose last `tail` sequences run at twice the CTAs a head
//   (api._decode_halved_tail): (ctas_per_head * H, 1, N + tail), each of those sequences taking two z
//   indices, so that their CTAs, half as long, are dispatched last and shorten the launch's drain
//   (benchmarks/NOTES.md, round 27). One division by H, which several waves hide (round 18); at H = 1 it
//   reads the common grid the same way.
__device__ __forceinline__ DecodeCta decode_cta_of(const KdaParams& p) {
  if (gridDim.y == 1) {
    if (gridDim.z == 1) {  // flattened (or N = H = 1, where every reading agrees)
      const int ctas_per_head = gridDim.x / (p.num_seqs * p.num_heads);
      const int unit = blockIdx.x / ctas_per_head;
      return {static_cast<int>(blockIdx.x) - unit * ctas_per_head, unit % p.num_heads, unit / p.num_heads, ctas_per_head};
    }
    const int ctas_per_head = gridDim.x / p.num_heads;  // a power of two
    const int head = blockIdx.x >> (__ffs(ctas_per_head) - 1), slice = blockIdx.x & (ctas_per_head - 1);
    const int halved_from = 2 * p.num_seqs - static_cast<int>(gridDim.z);  // the first halved sequence (N: none)
    const int pair = static_cast<int>(blockIdx.z) - halved_from;
    if (pair < 0) return {slice, head, static_cast<int>(blockIdx.z), ctas_per_head};
    return {slice + ctas_per_head * (pair & 1), head, halved_from + (pair >> 1), 2 * ctas_per_head};
  }
  return {static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.z),
          static_cast<int>(gridDim.x)};
}

// A CTA owns a slice of 128 / ctas_per_head value rows of one (sequence, head) (the host picks
// ctas_per_head, a power of two; decode_cta_of); each warp holds its share in groups of 4 rows, so
// that the per-token work (loads, norms, gate) is done once per warp and shared by all its groups.
// BUILD: kOneGroup (8 CTAs per head, one group per warp in registers: more CTAs resident, for small
// batches and most fp32 steps), or kStreamed / kTokenOuter (2 or 4 CTAs per head, each warp keeps 4 or
// 2 groups in shared memory; see DecodeConfig).
// Gate: the gate kind (kda_gate.cuh), named by the specialisation (spec.py GATES).
template <int STATE_IN, int STATE_OUT, bool VARLEN, int BUILD, class Gate>
__device__ __forceinline__ void kda_decode(const KdaParams& p) {
  using Cfg = DecodeConfig;
  constexpr int R = Cfg::kRows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr bool kGrouped = BUILD != kOneGroup;
  const DecodeCta cta = decode_cta_of(p);
  // groups of R rows per warp: 8 / ctas_per_head (the one-group build: 8 CTAs a head, one group)
  const int groups = kGrouped ? Cfg::kMaxCtasPerHead >> (__ffs(cta.ctas_per_head) - 1) : 1;
  const int h = cta.head, seq = cta.seq;
  const int row0 = (cta.slice * Cfg::kWarps + warp) * groups * R;  // this warp's first value row
  const int c0 = lane * 4;                                          // this lane's first key channel

  // Global loads in two waves, so that a CTA waits for two round trips, not one per dependency:
  // first what the state's address needs (sequence bounds, has_initial_state, num_accepted_tokens, the
  // pool slots: lane j loads column j of the sequence's index row, so that the starting column picked by
  // num_accepted_tokens and every token's slot come from a shuffle), then the state rows, the first
  // token's inputs and the gate's parameters. Later tokens are loaded one ahead. The first wave is one
  // straight run of predicated loads (kda_arch.cuh ld_global_*_if), none used before all are issued:
  // behind branches the compiler waited for the bounds before it issued the slot's load, and for the slot
  // before the rest (benchmarks/NOTES.md, round 16).
  const bool pool = (p.features & kFeaturePool) != 0;
  const bool per_token = (p.features & kFeaturePerToken) != 0;
  const PoolArgs& pa = p.ext.pool;
  long long first_raw = 0, end_raw = 0;  // the sequence's cu_seqlens entries
  if constexpr (VARLEN) {
    first_raw = load_index_if(p.cu_seqlens, p.cu_seqlens_int64, seq, true);
    end_raw = load_index_if(p.cu_seqlens, p.cu_seqlens_int64, seq + 1, true);
  }
  const bool lane_has_slot = pool && lane < pa.indices_cols;
  const long long lane_slot_raw =
      load_index_if(pa.state_indices, pa.indices_int64, lane_has_slot ? seq * pa.indices_row_stride + lane : 0, lane_has_slot);
  const bool has_initial = ld_global_u8_if(pa.has_initial_state + seq, (p.features & kFeatureHasInitial) != 0) != 0;
  const long long accepted =
      load_index_if(pa.num_accepted_tokens, pa.accepted_int64, seq, pool && per_token && pa.num_accepted_tokens != nullptr);

  long long bos, eos;
  sequence_bounds<VARLEN>(p, seq, bos, eos, [&](int i) { return i == seq ? first_raw : end_raw; });
  const int lane_slot32 = lane_has_slot && slot_valid(p, lane_slot_raw) ? static_cast<int>(lane_slot_raw) : -1;
  auto column_slot = [&](long long column) -> long long {  // warp-uniform column
    const int from_lane = __shfl_sync(kFullMask, lane_slot32, static_cast<int>(column & 31));
    return column < 32 ? from_lane : index_slot(p, seq, column);
  };
  const StatePlan plan = plan_state(p, seq, h, [&] { return has_initial; }, [&] { return accepted; }, column_slot);
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
  // The grouped builds keep all of a warp's row groups (4 or 2) in a per-warp ring of shared memory:
  // the initial rows land there with cp.async (loads in flight hold no registers). In the token-outer
  // build each group's state waits there in fp32 between tokens while the warp applies the token to its
  // other groups, so that a token's preparation (norms, gate, sigmoid) is done once per warp for all of
  // them; the streamed build (one token) keeps rows as stored, half the bytes for bf16 states. Each lane
  // reads and writes only its own bytes of each row, except in the streamed build's bf16 copies: a group
  // (its 4 rows, 1 KB contiguous in the state and in the ring) goes as two 16-byte pieces a lane when the
  // state is 16-byte aligned, so that lanes read bytes other lanes copied (rows_landed syncs the warp), and
  // as each lane's own 8 bytes of each row when it is not (a pool's slot stride need only be a multiple of
  // 4 elements); both forms are predicated copies, no branch (benchmarks/NOTES.md, rounds 31 and 31d).
  constexpr int kInBytes = STATE_IN == kStateFP32 ? 4 : 2;
  constexpr int kRingBytes = BUILD == kTokenOuter ? 4 : kInBytes;  // bytes per key channel in the ring
  constexpr bool kGroupCopies = BUILD == kStreamed && STATE_IN == kStateBF16;
  constexpr int kRowBytes = kHeadK * kRingBytes;
  __shared__ alignas(16) unsigned char ring[kGrouped ? Cfg::kWarps * Cfg::kMaxGroups * R : 1][kRowBytes];
  unsigned char* const ring_warp = ring[warp * Cfg::kMaxGroups * R];  // 16-byte aligned
  unsigned char* const ring_lane = ring_warp + c0 * kRingBytes;      // this lane's bytes of its warp's first row
  auto ring_row = [&](int group, int r) -> unsigned char* { return ring_lane + (group * R + r) * kRowBytes; };
  // this lane's bytes of the warp's first row, or null when the state starts from zeros
  const unsigned char* state_source =
      plan.read_offset >= 0
          ? static_cast<const unsigned char*>(p.initial_state) + (plan.read_offset + static_cast<long long>(row0) * kHeadK + c0) * kInBytes
          : nullptr;
  // the grouped builds: every group's initial rows into the ring, one commit group per row group (empty
  // past the warp's groups, so that group g has landed once at most kMaxGroups - 1 - g are pending)
  auto stage_initial_rows = [&]() {
#pragma unroll
    for (int group = 0; group < Cfg::kMaxGroups; ++group) {
      const bool copy = state_source != nullptr && group < groups;
      if constexpr (kGroupCopies) {
        // the state's rows start 16-byte aligned or 8 bytes past (read_offset is a multiple of 4 elements)
        const bool aligned = (plan.read_offset & 7) == 0;
        constexpr int kHalf = R * kRowBytes / 2;
        unsigned char* const group_start = ring_warp + group * R * kRowBytes;
        const auto* src = reinterpret_cast<const unsigned char*>(  // not read unless copy
            reinterpret_cast<uintptr_t>(state_source) - c0 * kInBytes + group * R * kRowBytes);
        cp_async_16_if(group_start + lane * 16, src + lane * 16, copy && aligned);
        cp_async_16_if(group_start + kHalf + lane * 16, src + kHalf + lane * 16, copy && aligned);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          cp_async_8_if(ring_row(group, r), src + r * kRowBytes + c0 * kInBytes, copy && !aligned);
        }
      } else if (copy) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const unsigned char* src = state_source + (group * R + r) * kHeadK * kInBytes;
          if constexpr (STATE_IN == kStateFP32) {
            cp_async_16(ring_row(group, r), src, true);
          } else {
            cp_async_8(ring_row(group, r), src);
          }
        }
      }
      cp_async_commit();
    }
  };
  // a group's initial rows have landed, for every lane of the warp
  auto rows_landed = [&](int group) {
    cp_async_wait_groups(Cfg::kMaxGroups - 1 - group);
    if constexpr (kGroupCopies) __syncwarp();
  };
  // a group's state before token t: the initial rows as staged (t = 0), else the fp32 rows kept (token-outer)
  auto ring_read = [&](int group, int t, float (&rows)[R][4]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float4 row = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (t > 0 || STATE_IN == kStateFP32) {
        if (t > 0 || state_source != nullptr) row = *reinterpret_cast<const float4*>(ring_row(group, r));
      } else if constexpr (STATE_IN == kStateBF16) {
        if (state_source != nullptr) row = unpack_bf16x4(*reinterpret_cast<const uint2*>(ring_row(group, r)));
      }
      rows[r][0] = row.x, rows[r][1] = row.y, rows[r][2] = row.z, rows[r][3] = row.w;
    }
  };
  auto ring_write = [&](int group, const float (&rows)[R][4]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      *reinterpret_cast<float4*>(ring_row(group, r)) = make_float4(rows[r][0], rows[r][1], rows[r][2], rows[r][3]);
    }
  };
  auto load_rows = [&](float (&rows)[R][4]) {  // the one-group build: straight to registers
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float4 row = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (plan.read_offset >= 0) {
        row = load_state4<STATE_IN>(p.initial_state, plan.read_offset + static_cast<long long>(row0 + r) * kHeadK + c0);
      }
      rows[r][0] = row.x, rows[r][1] = row.y, rows[r][2] = row.z, rows[r][3] = row.w;
    }
  };

  auto load_v = [&](int t, int group) { return *reinterpret_cast<const uint2*>(v_head + t * sv.token + group * R); };
  auto load_token = [&](int t) -> TokenRaw {
    return {*reinterpret_cast<const uint2*>(q_head + t * sq.token), *reinterpret_cast<const uint2*>(k_head + t * sk.token),
            *reinterpret_cast<const uint2*>(g_head + t * sg.token), beta_head[t * sb.token]};
  };
  // The one-group build stages its later tokens one token ahead with cp.async (TokenStage): the loads in
  // flight hold no registers while the warp works on the current token. Lane g < groups copies the values
  // of group g. (The streamed build runs one token: a later one, if the host's hint was wrong, is loaded
  // when needed; the token-outer build shares its tokens through shared memory: SharedToken.)
  __shared__ TokenStage stages[BUILD == kOneGroup ? Cfg::kWarps : 1];
  TokenStage& stage = stages[warp];
  auto stage_token = [&](int t) {
    cp_async_8(&stage.q[lane], q_head + t * sq.token);
    cp_async_8(&stage.k[lane], k_head + t * sk.token);
    cp_async_8(&stage.g[lane], g_head + t * sg.token);
    if (lane < groups) cp_async_8(&stage.v[t & 1][lane], v_head + t * sv.token + lane * R);
    return beta_head[t * sb.token];
  };
  auto staged_token = [&](bf16 beta) -> TokenRaw { return {stage.q[lane], stage.k[lane], stage.g[lane], beta}; };

  float S[R][4];  // the current group's rows
  // The current group's rows into a state at `base`; `streaming` (cute::true_type for verify's per-token
  // states, false_type for final states) picks store_state4's cache hint.
  auto store_rows = [&](long long base, int rows0, auto streaming) {
    // one 64-bit index for the group: the rows follow at constant distances (immediate offsets)
    const long long first = base + static_cast<long long>(rows0) * kHeadK + c0;
#pragma unroll
    for (int r = 0; r < R; ++r) store_state4<STATE_OUT, decltype(streaming)::value>(p.final_state, first + r * kHeadK, S[r]);
  };
  // What a token's groups share, worked out once per token rather than once per group (verify is bound by
  // the instructions it issues): where this lane's output element of token t goes (rows0 to be added)...
  auto token_output = [&](int t) { return p.out + ((bos + t) * p.num_heads + h) * kHeadV + output_row(lane); };
  // ... and where the state after token t goes when verify stores every token's (a pool: final_state is
  // set), else -1
  auto token_state = [&](int t) { return per_token ? token_state_offset(p, h, t, column_slot) : -1ll; };
  // A token on the group of rows starting at rows0 and its output row; then its state at `state_offset`
  // (>= 0; verify).
  auto apply_and_output = [&](const TokenPrep& prep, uint2 v_raw, int rows0, bf16* output) {
    const float o = apply_token(prep, v_raw, S, lane);
    if (writes_output(lane)) output[rows0] = __float2bfloat16_rn(o);  // four lanes, one 8-byte segment
  };
  auto store_token_state = [&](int rows0, long long state_offset) {
    if (state_offset >= 0) store_rows(state_offset, rows0, cute::true_type{});
  };
  auto finish_token = [&](const TokenPrep& prep, uint2 v_raw, int rows0, bf16* output, long long state_offset) {
    apply_and_output(prep, v_raw, rows0, output);
    store_token_state(rows0, state_offset);
  };
  auto store_final = [&](int rows0) {  // the state after the sequence, unless verify stored every token's
    if (!per_token && p.final_state != nullptr) store_rows(plan.write_offset, rows0, cute::false_type{});
  };

  // The second wave of loads: the initial rows (the grouped builds: into the ring, group by group, so
  // that the first token starts on a group as soon as its rows have landed), the first token (token-outer:
  // warp w prepares the first round's token w, SharedToken), straight to registers, its values (lane l
  // holds those of group l mod groups; the streamed build: group 0's on every lane, each later group's at
  // that group), and the gate's parameters.
  if constexpr (kGrouped) {
    stage_initial_rows();
  } else {
    load_rows(S);
  }
  const int first_token = BUILD == kTokenOuter ? warp : 0;
  const TokenRaw first = first_token < seq_len ? load_token(first_token) : TokenRaw{};
  // (token-outer: lane l < kWarps * groups those of the CTA's row group l, i.e. of warp l / groups)
  auto load_cta_values = [&](int t) {
    return lane < Cfg::kWarps * groups ? load_v(t, lane - warp * groups) : uint2{};
  };
  const uint2 first_values = first_token >= seq_len  ? uint2{}
                             : BUILD == kTokenOuter ? load_cta_values(first_token)
                                                    : load_v(0, BUILD == kStreamed ? 0 : lane & (groups - 1));
  // The gate's parameters last: loaded in the first wave, ptxas used them between the row loads, and
  // fp32 one-token steps ran 4-11% slower from N = 8 (benchmarks/NOTES.md, round 16).
  const Gate gate(p, Gate::load(p, h, c0));
  TokenPrep prep = BUILD != kTokenOuter && seq_len > 0 ? prepare_token(p, first, gate) : TokenPrep{};

  if constexpr (BUILD == kStreamed) {
    // Groups outside: each group's rows from the ring, its token(s), its final state.
    uint2 values = first_values;
#pragma unroll 1
    for (int group = 0; group < groups; ++group) {
      const int rows0 = row0 + group * R;
      if (group > 0 && seq_len > 0) values = load_v(0, group);
      rows_landed(group);
      ring_read(group, 0, S);
      if (seq_len > 0) finish_token(prep, values, rows0, token_output(0), token_state(0));
#pragma unroll 1
      for (int t = 1; t < seq_len; ++t) {
        finish_token(prepare_token(p, load_token(t), gate), load_v(t, group), rows0, token_output(t), token_state(t));
      }
      store_final(rows0);
    }
  } else if constexpr (BUILD == kTokenOuter) {
    // Tokens outside, groups inside, in rounds of up to kRoundTokens tokens: warp w prepares the round's
    // token w into shared memory (SharedToken), so that a token's norms and gate are worked out once per
    // CTA, not once per warp, and no warp waits on them between tokens (benchmarks/NOTES.md, round 21).
    // A warp walks its groups in alternate orders from token to token: within a round, the group a token
    // ends on starts the next with its rows still in registers. Token 0's groups wait for their initial
    // rows and read them as stored; a sequence with no tokens makes one pass that only moves its state.
    constexpr int kRoundTokens = SharedToken::kRoundTokens;
    __shared__ SharedToken shared_tokens[kRoundTokens];
    auto share_token = [&](SharedToken& slot, const TokenRaw& in, uint2 values, const Gate& token_gate) {
      const TokenScales scales = token_scales(p, in);
      slot.q[lane] = in.q, slot.k[lane] = in.k, slot.decays[lane] = token_decays(in, token_gate);
      if (lane == 0) slot.scales = scales;
      if (lane < Cfg::kWarps * groups) slot.values[lane] = values;
    };
    auto shared_token = [&](const SharedToken& slot) {
      return lane_token(slot.q[lane], slot.k[lane], slot.decays[lane], slot.scales);
    };
    const int tokens = max(seq_len, 1);
    if (warp < seq_len) share_token(shared_tokens[warp], first, first_values, gate);
    __syncthreads();  // the first round's tokens are shared
#pragma unroll 1
    for (int round_start = 0; round_start < tokens; round_start += kRoundTokens) {
      if (round_start > 0) {
        __syncthreads();  // every warp is done with the last round's tokens
        // the gate's parameters loaded again (L1/L2 hits) rather than held through the rounds: ptxas
        // spilled them at the build's 80 registers
        const int t = round_start + warp;
        if (t < seq_len) {
          share_token(shared_tokens[warp], load_token(t), load_cta_values(t), Gate(p, h, c0));
        }
        __syncthreads();  // the round's tokens are shared
      }
      const int round_end = min(round_start + kRoundTokens, tokens);
#pragma unroll 1
      for (int t = round_start; t < round_end; ++t) {
        const bool last = t + 1 >= seq_len;
        const SharedToken& token = shared_tokens[t - round_start];
        if (t < seq_len) prep = shared_token(token);
        bf16* const output = token_output(t);
        const long long state_offset = t < seq_len ? token_state(t) : -1;
#pragma unroll 1
        for (int i = 0; i < groups; ++i) {
          const int group = t & 1 ? groups - 1 - i : i;
          const int rows0 = row0 + group * R;
          if (t == 0) {
            rows_landed(group);
            ring_read(group, 0, S);
          } else if (i > 0 || t == round_start) {
            ring_read(group, 1, S);  // the fp32 rows the ring kept (else the last token's, in registers)
          }
          const uint2 values = token.values[warp * groups + group];
          // the ring write (STS.128: each row in four consecutive registers) before the per-token store,
          // whose packs ptxas otherwise placed so that it copied the rows back with 16 MOVs a group and
          // token (benchmarks/NOTES.md, round 18)
          if (t < seq_len) apply_and_output(prep, values, rows0, output);
          // the group a token ends on keeps its rows in registers for the next token of the round (not
          // across a round's barrier and preparation: ptxas spilled there)
          const bool rows_kept = i + 1 == groups && t + 1 < round_end;
          if (!last && !rows_kept) ring_write(group, S);
          if (t < seq_len) store_token_state(rows0, state_offset);
          if (last) store_final(rows0);
        }
      }
    }
  } else {
    // One group per warp, its rows in registers across the tokens.
    uint2 values = first_values;
    bf16 beta_upcoming = seq_len > 1 ? stage_token(1) : bf16{};
    for (int t = 0; t < seq_len; ++t) {
      finish_token(prep, values, row0, token_output(t), token_state(t));
      if (t + 1 < seq_len) {
        cp_async_wait_all();
        __syncwarp();  // lane 0's copy of the values is visible to the warp
        const TokenRaw upcoming = staged_token(beta_upcoming);
        values = stage.v[(t + 1) & 1][0];
        __syncwarp();  // every lane has read the stage before it is refilled
        if (t + 2 < seq_len) beta_upcoming = stage_token(t + 2);
        prep = prepare_token(p, upcoming, gate);
      }
    }
    store_final(row0);
  }
}

}  // namespace flash_kda
