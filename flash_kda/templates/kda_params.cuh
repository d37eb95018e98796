// flash_kda: the kernel parameters and how a kernel finds its data in them: sequence bounds,
// strided inputs, state slots in a pool, state fragments in either storage dtype.
//
// KdaParams is passed by value; flash_kda/jit/params.py mirrors it field for field (checked at
// import and in tests).  The host always fills the core; it fills `ext` only when `features` says
// that some extension is in use, so a kernel must not read an `ext` field whose feature bit is clear.
#pragma once

#include "kda_arch.cuh"

namespace flash_kda {

constexpr int kHeadK = 128;   // key head dim
constexpr int kHeadV = 128;   // value head dim
constexpr int kChunk = 16;    // tokens per chunk

// State storage kinds (must match flash_kda/jit/spec.py). Whether a call has a state at all is a run-time
// fact: a null initial_state reads zeros, a null final_state stores nothing.
constexpr int kStateBF16 = 1;
constexpr int kStateFP32 = 2;

// Feature bits of KdaParams::features (must match flash_kda/jit/params.py).
constexpr int kFeatureStrided = 1;      // ext.{q,k,v,g,beta} strides instead of contiguous [B, T, H, D]
constexpr int kFeaturePool = 2;         // states live in pools addressed by ext.state_indices
constexpr int kFeaturePerToken = 4;     // 2-D state_indices: the state after every token is stored
constexpr int kFeatureHasInitial = 8;   // ext.has_initial_state says which sequences read a state
constexpr int kFeatureCheckpoints = 16; // ext.checkpoint_offsets / checkpoint_state

struct TensorStrides {  // in elements; the last dim is contiguous
  long long batch, token, head;
};

// The extension, in three blocks the host fills independently (each only when one of its features is on).
struct PoolArgs {                         // kFeaturePool and/or kFeatureHasInitial
  const void* state_indices;              // kFeaturePool: [N] or [N, T_max] int32/int64
  const unsigned char* has_initial_state; // kFeatureHasInitial: [N] bool
  const void* num_accepted_tokens;        // kFeaturePerToken (or null: column 0): [N] int32/int64
  long long initial_slot_stride;          // elements between slots of the initial-state pool
  long long final_slot_stride;            // ... of the final-state pool
  long long indices_row_stride;           // elements between rows of a 2-D state_indices
  int num_slots;                          // slots valid in every pool given
  int indices_cols;                       // T_max of a 2-D state_indices (1 when 1-D)
  int indices_int64;
  int accepted_int64;
};

struct CheckpointArgs {                   // kFeatureCheckpoints
  const void* checkpoint_offsets;         // [N, C] int32/int64
  void* checkpoint_state;                 // [N, C, H, V, K] fp32 or bf16
  int num_checkpoints;                    // C
  int offsets_int64;
  int checkpoint_bf16;
};

struct KdaExtras {
  TensorStrides q, k, v, g, beta;         // kFeatureStrided
  PoolArgs pool;
  CheckpointArgs ckpt;
};

struct KdaParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const bf16* g;
  const bf16* beta;
  bf16* out;                  // contiguous [B, T, H, V]
  const float* A_log;         // [H] or null (a = 1)
  const float* dt_bias;       // [H, K] or null (d = 0)
  const void* initial_state;  // [N, H, V, K] (or a pool) or null
  void* final_state;          // [N, H, V, K] (or a pool) or null
  const void* cu_seqlens;     // [N + 1] int32 or int64, varlen only
  long long total_tokens;     // rows of the flattened [B * T] token axis
  int seq_len;                // T (fixed-length mode)
  int num_heads;              // H
  int num_seqs;               // N
  int cu_seqlens_int64;       // 1 when cu_seqlens is int64
  float scale;
  float lower_bound;
  int features;               // kFeature* bits: which parts of `ext` are filled
  KdaExtras ext;
};

__device__ __forceinline__ long long load_index(const void* ptr, int is_int64, long long i) {
  return is_int64 ? static_cast<const long long*>(ptr)[i] : static_cast<long long>(static_cast<const int*>(ptr)[i]);
}

// The same as a branch-free pair of predicated 32-bit loads (kda_arch.cuh), 0 where `pred` is false.
__device__ __forceinline__ long long load_index_if(const void* ptr, int is_int64, long long i, bool pred) {
  const unsigned char* element = static_cast<const unsigned char*>(ptr) + (i << (is_int64 ? 3 : 2));
  const uint32_t low = ld_global_u32_if(element, pred);
  const uint32_t high = ld_global_u32_if(element + 4, pred && is_int64);  // little-endian: the upper word
  return is_int64 ? static_cast<long long>((static_cast<unsigned long long>(high) << 32) | low)
                  : static_cast<long long>(static_cast<int>(low));
}

// ---------------------------------------------------------------- sequences and inputs

// The layout: varlen when cu_seqlens is set. The chunked kernel reads it at run time (it is uniform over
// the grid, and decided once per CTA); the decode kernel, whose streamed build has no register to spare
// for the other path, is specialised on it (VARLEN).
__device__ __forceinline__ bool is_varlen(const KdaParams& p) { return p.cu_seqlens != nullptr; }

// A sequence's token range [bos, eos). Varlen: from its cu_seqlens entries, `entry(seq)` and `entry(seq + 1)`
// (loads, or values the caller loaded earlier).
template <bool VARLEN, class Entry>
__device__ __forceinline__ void sequence_bounds(const KdaParams& p, int seq, long long& bos, long long& eos, Entry entry) {
  if constexpr (VARLEN) {
    long long b = entry(seq);
    long long e = entry(seq + 1);
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

// (The loader captures the two values it needs, not the parameter block: a lambda holding a reference to
// `p` changed the chunked kernel's SASS.)
template <bool VARLEN>
__device__ __forceinline__ void sequence_bounds(const KdaParams& p, int seq, long long& bos, long long& eos) {
  const void* cu_seqlens = p.cu_seqlens;
  const int cu_int64 = p.cu_seqlens_int64;
  sequence_bounds<VARLEN>(p, seq, bos, eos, [=](int i) { return load_index(cu_seqlens, cu_int64, i); });
}

__device__ __forceinline__ void sequence_bounds(const KdaParams& p, int seq, long long& bos, long long& eos) {
  if (is_varlen(p)) {
    sequence_bounds<true>(p, seq, bos, eos);
  } else {
    sequence_bounds<false>(p, seq, bos, eos);
  }
}

enum InputTensor { kInputQ = 0, kInputK, kInputV, kInputG, kInputBeta };

// The strides of input `which` (head dim `dim`): from ext when strided, else those of a contiguous [B, T, H, dim].
__device__ __forceinline__ TensorStrides input_strides(const KdaParams& p, int which, int dim) {
  if (p.features & kFeatureStrided) return (&p.ext.q)[which];
  const long long token = static_cast<long long>(p.num_heads) * dim;
  return {token * p.seq_len, token, dim};
}

// Element offset of token `t` (counted from the sequence start) of head `h` in an input: varlen
// sequences are ranges of one packed token axis, fixed-length ones are batch rows.
__device__ __forceinline__ long long token_offset(const TensorStrides& s, bool varlen, int seq, long long bos,
                                                  long long t, int h) {
  return (varlen ? (bos + t) * s.token : seq * s.batch + t * s.token) + h * s.head;
}

// ---------------------------------------------------------------- states

// Where one (sequence, head) reads its initial state and writes its final one, in elements from
// initial_state / final_state.  A pool index that is negative or past the slots skips the sequence:
// no state is read or written and no output row is written.
struct StatePlan {
  long long read_offset;   // -1: start from zeros
  long long write_offset;  // ignored when there is no final state (or stores are per token)
  bool skip;
};

__device__ __forceinline__ bool slot_valid(const KdaParams& p, long long slot) {
  return slot >= 0 && slot < p.ext.pool.num_slots;
}

// The pool slot in column `column` of sequence `seq`'s row of state_indices (1-D indices: column 0).
__device__ __forceinline__ long long index_slot(const KdaParams& p, int seq, long long column) {
  return load_index(p.ext.pool.state_indices, p.ext.pool.indices_int64, seq * p.ext.pool.indices_row_stride + column);
}

// Where sequence `seq`'s state is read and written. The callables give what the plan reads from memory:
// `has_initial()` its has_initial_state entry (asked only with kFeatureHasInitial), `accepted()` its
// num_accepted_tokens entry (asked only for per-token states with that tensor), `column_slot(column)` the
// slot in a column of its index row. The chunked kernel loads each where it is asked; the decode kernel
// answers from what it loaded up front.
template <class HasInitial, class Accepted, class ColumnSlot>
__device__ __forceinline__ StatePlan plan_state(const KdaParams& p, int seq, int h, HasInitial has_initial,
                                                Accepted accepted, ColumnSlot column_slot) {
  const long long head_offset = static_cast<long long>(h) * kHeadV * kHeadK;
  bool read = p.initial_state != nullptr;
  if ((p.features & kFeatureHasInitial) && !has_initial()) read = false;
  if (!(p.features & kFeaturePool)) {
    const long long offset = static_cast<long long>(seq) * p.num_heads * kHeadV * kHeadK + head_offset;
    return {read ? offset : -1, offset, false};
  }
  long long column = 0;
  if ((p.features & kFeaturePerToken) && p.ext.pool.num_accepted_tokens != nullptr) {
    column = accepted() - 1;
    if (column < 0 || column >= p.ext.pool.indices_cols) return {-1, -1, true};
  }
  const long long slot = column_slot(column);
  if (!slot_valid(p, slot)) return {-1, -1, true};
  return {read ? slot * p.ext.pool.initial_slot_stride + head_offset : -1, slot * p.ext.pool.final_slot_stride + head_offset,
          false};
}

__device__ __forceinline__ StatePlan plan_state(const KdaParams& p, int seq, int h) {
  return plan_state(
      p, seq, h, [&] { return p.ext.pool.has_initial_state[seq] != 0; },
      [&] { return load_index(p.ext.pool.num_accepted_tokens, p.ext.pool.accepted_int64, seq); },
      [&](long long column) { return index_slot(p, seq, column); });
}

// Per-token stores (kFeaturePerToken): where the state after token `t` goes, or -1 for nowhere.
template <class ColumnSlot>
__device__ __forceinline__ long long token_state_offset(const KdaParams& p, int h, int t, ColumnSlot column_slot) {
  if (t >= p.ext.pool.indices_cols) return -1;
  const long long slot = column_slot(t);
  return slot_valid(p, slot) ? slot * p.ext.pool.final_slot_stride + static_cast<long long>(h) * kHeadV * kHeadK : -1;
}

// Two consecutive state elements (a key pair of one value row) in storage kind KIND.
template <int KIND>
__device__ __forceinline__ float2 load_state2(const void* base, long long idx) {
  if constexpr (KIND == kStateFP32) {
    return *reinterpret_cast<const float2*>(static_cast<const float*>(base) + idx);
  } else {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(static_cast<const bf16*>(base) + idx));
  }
}

template <int KIND>
__device__ __forceinline__ void store_state2(void* base, long long idx, float x, float y) {
  if constexpr (KIND == kStateFP32) {
    *reinterpret_cast<float2*>(static_cast<float*>(base) + idx) = make_float2(x, y);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(base) + idx) = __floats2bfloat162_rn(x, y);
  }
}

// Four consecutive state elements (the decode kernel: one lane's key channels of one value row).
template <int KIND>
__device__ __forceinline__ float4 load_state4(const void* base, long long idx) {
  if constexpr (KIND == kStateFP32) {
    return __ldcs(reinterpret_cast<const float4*>(static_cast<const float*>(base) + idx));
  } else {
    return unpack_bf16x4(__ldcs(reinterpret_cast<const uint2*>(static_cast<const bf16*>(base) + idx)));
  }
}

// STREAMING: st.global.cs (evict first) for verify's per-token states; a plain store for final states.
// Measured on the H100 (benchmarks/NOTES.md, rounds 5 and 17): plain stores make verify 2-3% slower and
// one-token steps 0.5-1% faster.
template <int KIND, bool STREAMING>
__device__ __forceinline__ void store_state4(void* base, long long idx, const float (&x)[4]) {
  if constexpr (KIND == kStateFP32) {
    const float4 value = make_float4(x[0], x[1], x[2], x[3]);
    float4* const dst = reinterpret_cast<float4*>(static_cast<float*>(base) + idx);
    if constexpr (STREAMING) __stcs(dst, value); else *dst = value;
  } else {
    const uint2 value = make_uint2(pack_bf16(x[0], x[1]), pack_bf16(x[2], x[3]));
    uint2* const dst = reinterpret_cast<uint2*>(static_cast<bf16*>(base) + idx);
    if constexpr (STREAMING) __stcs(dst, value); else *dst = value;
  }
}

}  // namespace flash_kda
