// flash_kda: the chunked kernel's launch shape per V-slice width and its shared-memory layout: the
// slot ring through which producer warps hand prepared chunks to the consumers (kda_fwd.cuh).
#pragma once

#include "kda_params.cuh"

namespace flash_kda {

constexpr int kRowPad = 136;  // bf16 row stride of 16x128 tiles read by ldmatrix (no bank conflicts)
constexpr int kSmallPad = 24; // bf16 row stride of 16x16 tiles read by ldmatrix

// Launch shape of one specialisation: the V-slice width, the cluster size and the slot ring.
//   CLUSTER: CTAs per cluster, consecutive V-slices of one (sequence, head) that share the chunk
//     preparation through distributed shared memory (sm_90+): 2 for the clustered variant of the 32-
//     and 64-wide slices (pairs, because clusters of 4 single-CTA SMs do not all fit at once on an
//     H100: cuOccupancyMaxActiveClusters 30 of 33, which would leave a second wave at 128 CTAs); 1
//     for the 128-wide slice and for the portable variant, whose CTAs each prepare every chunk.
//   PRODUCER_WARPS: 4, or 2 where shared memory is ~100 KB a block (the arch table, jit/arch.py).
//   PRODUCER_REMAT: the producer warps recompute what derives from their lane, warp and slot indices
//     (shared-memory addresses, ldmatrix lane offsets) at every chunk instead of holding it across the
//     chunk loop. Blackwell's ptxas spills those values from the general gates' producers at 255
//     registers otherwise (sm_90a's fits them, and keeps the code without the recomputation).
template <int VB, int CLUSTER, int PRODUCER_WARPS, bool PRODUCER_REMAT = false>
struct Config {
  static_assert(VB % 16 == 0 && kHeadV % VB == 0, "VB must divide the value head dim in 16-row slices");
  static_assert(CLUSTER == 1 || (CLUSTER == 2 && kHeadV / VB >= 2), "clusters are pairs of a head's V-slices");
  static_assert(PRODUCER_WARPS == 2 || PRODUCER_WARPS == 4, "2 or 4 producer warps");
  static constexpr int kVB = VB;
  static constexpr int kSplits = kHeadV / VB;  // CTAs per (sequence, head)
  static constexpr int kCluster = CLUSTER;
  static constexpr int kProducerWarps = PRODUCER_WARPS;
  static constexpr bool kProducerRemat = PRODUCER_REMAT;
  static constexpr int kSlots = kCluster * kProducerWarps;  // chunks in flight, one slot per producer warp
  static constexpr int kClusterV = kCluster * VB;             // value columns a producer loads
  static constexpr int kConsumerWarps = VB / 16;
  static constexpr int kConsumerThreads = kConsumerWarps * 32;
  static constexpr int kThreads = (kConsumerWarps + kProducerWarps) * 32;
};

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

// The anchored form's near pairs (kda_chunk_anchored.cuh), private to one producer warp: L and M of the
// pairs inside one quarter of the chunk, by row and by column within the quarter.
struct NearPairs {
  float l[kChunk][4];
  float m[kChunk][4];
};

template <class Cfg>
struct SharedStorage {
  Stage<Cfg::kVB> stage[Cfg::kSlots];
  RawChunk<Cfg::kClusterV> raw[Cfg::kProducerWarps];
  ProducerScratch scratch[Cfg::kProducerWarps];
  bf16 out[Cfg::kConsumerWarps][kChunk][kSmallPad];  // per consumer warp output staging
  uint64_t full[Cfg::kSlots];   // slot written (every CTA)
  uint64_t empty[Cfg::kSlots];  // slot consumed by every CTA (meaningful in the producing CTA)
  NearPairs near[Cfg::kProducerWarps];  // last: the bounded kernel's layout is the same without it
};

}  // namespace flash_kda
