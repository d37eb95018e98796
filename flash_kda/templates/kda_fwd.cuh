// flash_kda: chunked Kimi Delta Attention forward, sm_80 and later (every gate kind: kda_gate.cuh).
//
// A head's value axis is cut into kSplits slices of width VB; one CTA owns one (sequence,
// head, V-slice). In the clustered variant (sm_90+), consecutive pairs of a (sequence, head)'s
// slices form one thread-block cluster (Config::kCluster); in the portable variant every CTA
// prepares every chunk itself.  The recurrent state slice S (VB value rows x 128 key
// columns, fp32) lives in the registers of the consumer warps as the accumulator of CuTe's
// SM80 16x8x16 bf16 MMA atom; it is never written to memory between chunks (except into the
// checkpoints a caller asks for).
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
// docs/algorithm.md derives the algebra. The bounded gate (lower_bound >= -5) factorises each chunk's
// decay as e^{+-G} with |G| <= 80 nats; the other gates pick per chunk that form, or the centred or
// anchored one that hold for any gate (kda_chunk_anchored.cuh).
//
// The kernel is split by concern: kda_arch.cuh (architecture primitives), kda_params.cuh (the
// parameter block, sequences, inputs and states), kda_gate.cuh (gate math), kda_chunk_layout.cuh
// (launch shape, shared memory), kda_chunk_prepare.cuh (producers), kda_state_update.cuh
// (consumers), and this file, the entry.
#pragma once

#include "kda_arch.cuh"
#include "kda_chunk_layout.cuh"
#include "kda_chunk_prepare.cuh"
#include "kda_params.cuh"
#include "kda_state_update.cuh"

namespace flash_kda {

// ---------------------------------------------------------------- entry

// Cfg: the launch shape (Config<VB, CLUSTER, PRODUCER_WARPS>); Gate: the gate kind (kda_gate.cuh); both
// named by the specialisation (spec.py).
template <class Cfg, int STATE_IN, int STATE_OUT, class Gate>
__device__ __forceinline__ void kda_fwd(const KdaParams& p) {
  constexpr int VB = Cfg::kVB;
  constexpr int kSplits = Cfg::kSplits;
  constexpr int kCluster = Cfg::kCluster;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  SharedStorage<Cfg>& sm = *reinterpret_cast<SharedStorage<Cfg>*>(smem_raw);

  // The kSplits V-slices of one (sequence, head) are consecutive blocks; each run of kCluster of
  // them is one cluster (the grid is a multiple of kSplits, so clusters never straddle heads).
  const int block = blockIdx.x;
  const int split = block % kSplits;
  const int rank = kCluster == 1 ? 0 : static_cast<int>(cluster_rank());  // == split % kCluster
  const int h = (block / kSplits) % p.num_heads;
  const int seq = block / kSplits / p.num_heads;
  const int v0 = split * VB;
  const StatePlan plan = plan_state(p, seq, h);
  if (plan.skip) return;  // an invalid pool slot: every CTA of the cluster (one (sequence, head)) leaves here
  long long bos, eos;
  sequence_bounds(p, seq, bos, eos);
  const int seq_len = static_cast<int>(eos - bos);
  const int num_chunks = (seq_len + kChunk - 1) / kChunk;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < Cfg::kSlots; ++s) {
      mbar_init(&sm.full[s], 32);                                  // the producing warp's lanes
      mbar_init(&sm.empty[s], kCluster * Cfg::kConsumerThreads);   // every consumer lane of the cluster
    }
    mbar_init_fence();
  }
  // Barriers initialised in every CTA before any CTA's producer or consumer touches them.
  if constexpr (kCluster > 1) cluster_sync(); else __syncthreads();

  // The general gates' producers need more registers than a 384-thread CTA's even share (168 a thread:
  // ptxas spills 76 bytes there); the consumers' two warpgroups need fewer (about 120), so at 128 wide
  // they give theirs up. spec.v_blocks_for allows that shape only where the arch can (kda_arch.cuh).
  // The counts must fit what the CTA was launched with (168 x 384: an increase beyond it never returns).
  constexpr bool kReallocate = Cfg::kVB == 128 && !Gate::kFactorised;  // spec.py: KernelSpec.launch_registers
  constexpr int kLaunchRegisters = 65536 / Cfg::kThreads / 8 * 8;
  constexpr int kProducerRegisters = 232, kConsumerRegisters = 136;
  static_assert(!kReallocate || (Cfg::kProducerWarps == 4 && Cfg::kConsumerWarps == 8 &&
                                 kProducerRegisters + 2 * kConsumerRegisters <= 3 * kLaunchRegisters),
                "register reallocation: one producer warpgroup, two consumer warpgroups, the launch's registers");
#if !FLASH_KDA_REGISTER_REALLOCATION
  static_assert(!kReallocate, "the general gates' 128-wide slices need setmaxnreg (spec.v_blocks_for)");
#endif

  if (threadIdx.x >= Cfg::kConsumerThreads) {
#if FLASH_KDA_REGISTER_REALLOCATION
    if constexpr (kReallocate) raise_register_count<kProducerRegisters>();
#endif
    const int ptid = threadIdx.x - Cfg::kConsumerThreads;
    producer<Cfg, Gate>(p, sm, seq, h, (split - rank) * VB, bos, seq_len, num_chunks, rank, ptid >> 5, ptid & 31);
  } else {
#if FLASH_KDA_REGISTER_REALLOCATION
    if constexpr (kReallocate) lower_register_count<kConsumerRegisters>();
#endif
    consumer<Cfg, STATE_IN, STATE_OUT>(p, sm, plan, seq, h, v0, bos, seq_len, num_chunks, threadIdx.x >> 5,
                                      threadIdx.x & 31);
  }
  // No CTA leaves while another may still write into its slots or arrive on its barriers.
  if constexpr (kCluster > 1) cluster_sync();
}

}  // namespace flash_kda
