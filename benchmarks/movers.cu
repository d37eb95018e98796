// What the serving steps' bytes cost with no arithmetic at all: kernels that only move a one-token step's or a
// speculative verify's bytes, in the pattern bench_decode.py's rows use (benchmarks/NOTES.md, "What the bf16 rows'
// bytes cost with the step's inputs"). Each (sequence, head) state of a pool (V = K = 128) is read from one random
// slot and written to T random slots (T = 1: back in place, a decode step; T > 1: verify's per-token states), CTAS
// CTAs of 128 threads (or 256) a (sequence, head), 16-byte loads and stores; optionally with the step's inputs (q, k,
// g and v read, out written, [N, T, H, 128] bf16, as the decode kernel reads them: each CTA its head's q, k, g and its
// rows' values). Timed as bench_decode.py's step graph: 8 launches on 8 pools in a CUDA graph, the L2 flushed
// before each replay, the median of 30 replays, µs a launch. Three tables: the store kinds, CTAs a head and slot
// orders; then, with the step's inputs and our kernels' store kinds, the CTAs an SM held down with dynamic shared
// memory to what our kernels' registers and shared memory allow (benchmarks/NOTES.md, round 32); then persistent
// grids at those residencies (round 33).
//
//   nvcc -O3 -arch=sm_90a -o /tmp/movers benchmarks/movers.cu && /tmp/movers [copy bandwidth in TB/s]
//
// The floor is the state bytes over the bandwidth given (bench_decode.py prints its own, from torch's copy), or
// over a 1 GiB cudaMemcpyAsync's measured here. Prints markdown tables; not part of the package or its tests.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

constexpr int kHeads = 32, kStateElems = 128 * 128, kPools = 8, kReps = 30;
constexpr int kMaxSlots = 2048, kMaxTokens = 1024;  // pool slots, and N * T of the largest row

#define CHECK(x)                                                              \
  do {                                                                        \
    cudaError_t err = (x);                                                    \
    if (err != cudaSuccess) {                                                 \
      std::printf("%s: %s\n", #x, cudaGetErrorString(err));                   \
      std::exit(1);                                                           \
    }                                                                         \
  } while (0)

struct StepInputs {  // [N, T, H, 128] bf16, read and written as 8-byte words (4 channels a lane)
  const uint2 *q, *k, *g, *v;
  uint2* out;
};

enum Store { kStreaming = 0, kPlain = 1 };

// ELEM: bytes a state element (2 bf16, 4 fp32); CTAS: CTAs a (sequence, head); T: tokens; THREADS a CTA.
template <int ELEM, int CTAS, int T, int STORE, bool INPUTS, int THREADS>
__global__ void __launch_bounds__(THREADS) move_step(char* pool, const int* read_slot, const int* token_slots,
                                                     StepInputs in) {
  constexpr int kHeadBytes = kStateElems * ELEM, kSliceBytes = kHeadBytes / CTAS;
  constexpr int kThreads = THREADS, kChunks = kSliceBytes / 16 / kThreads;  // 16-byte pieces a thread
  constexpr int kValueWords = 32 / CTAS;                // the slice's values: 8-byte words of a token's v
  const int seq = blockIdx.z, head = blockIdx.y, slice = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long slice_offset = static_cast<long long>(head) * kHeadBytes + slice * kSliceBytes;
  const char* source = pool + static_cast<long long>(read_slot[seq]) * kHeads * kHeadBytes + slice_offset;
  uint4 rows[kChunks];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) rows[i] = *reinterpret_cast<const uint4*>(source + (i * kThreads + threadIdx.x) * 16);
  uint32_t mixed = 0;  // every input byte read feeds the stores, so that no load is dropped
  if constexpr (INPUTS) {
    for (int t = warp; t < T; t += kThreads / 32) {  // warp w: token w's q, k, g; the slice's values
      const long long token = (static_cast<long long>(seq) * T + t) * kHeads + head;
      mixed ^= in.q[token * 32 + lane].x ^ in.k[token * 32 + lane].y ^ in.g[token * 32 + lane].x;
      if (lane < kValueWords) mixed ^= in.v[token * 32 + slice * kValueWords + lane].y;
    }
  }
#pragma unroll 1
  for (int t = 0; t < T; ++t) {
    char* target = pool + static_cast<long long>(token_slots[seq * T + t]) * kHeads * kHeadBytes + slice_offset;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      uint4 piece = rows[i];
      piece.x ^= mixed;
      uint4* address = reinterpret_cast<uint4*>(target + (i * kThreads + threadIdx.x) * 16);
      if constexpr (STORE == kStreaming) {
        __stcs(address, piece);
      } else {
        *address = piece;
      }
    }
    if constexpr (INPUTS) {
      const long long token = (static_cast<long long>(seq) * T + t) * kHeads + head;
      if (warp == 0 && lane < kValueWords) in.out[token * 32 + slice * kValueWords + lane] = make_uint2(mixed, t);
    }
  }
}

// The same bytes moved by a persistent grid: gridDim.x CTAs walk the (sequence, head, slice) units in order, unit
// blockIdx.x + i * gridDim.x (or, with a counter `claimed`, the next unit no CTA has claimed). With PREFETCH a CTA loads the next unit's rows (cp.async into shared memory, as a
// kernel whose registers hold the current unit's fp32 rows would) and inputs before the current unit's
// stores (loads in flight while they drain: one round trip a CTA, not one a unit); without it, after them. Launch
// bounds for 6 CTAs of 128 threads an SM (3 of 256), the residency of the token-outer verify.
template <int ELEM, int CTAS, int T, int STORE, int THREADS, bool PREFETCH>
__global__ void __launch_bounds__(THREADS, 768 / THREADS) move_step_persistent(char* pool, const int* read_slot,
                                                                const int* token_slots, StepInputs in, int units,
                                                                int* claimed) {
  constexpr int kHeadBytes = kStateElems * ELEM, kSliceBytes = kHeadBytes / CTAS;
  constexpr int kThreads = THREADS, kChunks = kSliceBytes / 16 / kThreads;
  constexpr int kValueWords = 32 / CTAS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  struct Unit {
    int seq, head, slice;
  };
  auto unit_of = [](int unit) { return Unit{unit / (kHeads * CTAS), unit / CTAS % kHeads, unit % CTAS}; };
  auto slice_offset = [](const Unit& u) { return static_cast<long long>(u.head) * kHeadBytes + u.slice * kSliceBytes; };
  auto load_rows = [&](const Unit& u, uint4 (&rows)[kChunks]) {
    const char* source = pool + static_cast<long long>(read_slot[u.seq]) * kHeads * kHeadBytes + slice_offset(u);
#pragma unroll
    for (int i = 0; i < kChunks; ++i) rows[i] = *reinterpret_cast<const uint4*>(source + (i * kThreads + threadIdx.x) * 16);
  };
  auto load_inputs = [&](const Unit& u, uint32_t (&words)[4]) {  // this warp's token of the unit, if it has one
    words[0] = words[1] = words[2] = words[3] = 0;
    if (warp < T) {
      const long long token = (static_cast<long long>(u.seq) * T + warp) * kHeads + u.head;
      words[0] = in.q[token * 32 + lane].x, words[1] = in.k[token * 32 + lane].y, words[2] = in.g[token * 32 + lane].x;
      if (lane < kValueWords) words[3] = in.v[token * 32 + u.slice * kValueWords + lane].y;
    }
  };
  // the next unit's rows land in this CTA's (dynamic) shared memory, each thread's own pieces: no barrier
  extern __shared__ uint4 next_rows[];
  auto prefetch_rows = [&](const Unit& u) {
    const char* source = pool + static_cast<long long>(read_slot[u.seq]) * kHeads * kHeadBytes + slice_offset(u);
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const uint32_t target = static_cast<uint32_t>(__cvta_generic_to_shared(&next_rows[i * kThreads + threadIdx.x]));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(target),
                   "l"(source + (i * kThreads + threadIdx.x) * 16));
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  // the dynamic movers' last CTA to finish zeroes the counters for the next launch (no memset node in the graph)
  struct ResetCounters {
    int* claimed;
    __device__ ~ResetCounters() {
      if (claimed == nullptr || threadIdx.x != 0) return;
      __threadfence();  // this CTA's claims before its count
      if (atomicAdd(claimed + 1, 1) == static_cast<int>(gridDim.x) - 1) claimed[0] = claimed[1] = 0;
    }
  } reset{claimed};
  int unit = blockIdx.x;
  if (unit >= units) return;
  uint4 rows[kChunks];
  uint32_t words[4], next_words[4];
  Unit current = unit_of(unit);
  load_rows(current, rows);
  load_inputs(current, words);
  __shared__ int claimed_unit;
#pragma unroll 1
  for (int following; unit < units; unit = following) {
    if (claimed != nullptr) {  // dynamic: the next unit is the next one no CTA has claimed
      if (threadIdx.x == 0) claimed_unit = gridDim.x + atomicAdd(claimed, 1);
      __syncthreads();
      following = claimed_unit;
      __syncthreads();
    } else {
      following = unit + gridDim.x;
    }
    const Unit next = unit_of(following < units ? following : unit);
    if constexpr (PREFETCH) {
      if (following < units) {
        prefetch_rows(next);
        load_inputs(next, next_words);
      }
    }
    const uint32_t mixed = words[0] ^ words[1] ^ words[2] ^ words[3];  // every input byte feeds the stores
#pragma unroll 1
    for (int t = 0; t < T; ++t) {
      const long long token = (static_cast<long long>(current.seq) * T + t) * kHeads + current.head;
      char* target = pool + static_cast<long long>(token_slots[current.seq * T + t]) * kHeads * kHeadBytes +
                     slice_offset(current);
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        uint4 piece = rows[i];
        piece.x ^= mixed;
        uint4* address = reinterpret_cast<uint4*>(target + (i * kThreads + threadIdx.x) * 16);
        if constexpr (STORE == kStreaming) {
          __stcs(address, piece);
        } else {
          *address = piece;
        }
      }
      if (warp == 0 && lane < kValueWords) in.out[token * 32 + current.slice * kValueWords + lane] = make_uint2(mixed, t);
    }
    if (following >= units) break;
    if constexpr (PREFETCH) {
      asm volatile("cp.async.wait_all;\n" ::: "memory");
#pragma unroll
      for (int i = 0; i < kChunks; ++i) rows[i] = next_rows[i * kThreads + threadIdx.x];
#pragma unroll
      for (int i = 0; i < 4; ++i) words[i] = next_words[i];
    } else {
      load_rows(next, rows);
      load_inputs(next, words);
    }
    current = next;
  }
}

// Dynamic shared memory a CTA that leaves room for at most `ctas` CTAs an SM (the H100's 228 KB an SM, 1 KB of it
// reserved a CTA), as long as registers allow that many.
int smem_for(int ctas) { return 233472 / ctas - 1024 - 256; }

struct Bench {
  cudaStream_t stream;
  cudaEvent_t start, stop;
  char* flush;  // 64 MB written before each replay: the L2 holds nothing of the step
  std::vector<char*> pools;
  std::vector<StepInputs> inputs;
  int *read_slot, *token_slots, *read_slot_ordered, *token_slots_ordered;
  int* claimed;  // the dynamic persistent movers' counters (units claimed, CTAs done), two a pool, zeroed

  // µs a launch: a graph of kPools launches, one per pool and its inputs (bench_decode.py's step graph)
  template <class Launch>
  double time_step(Launch launch) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    for (int p = 0; p < kPools; ++p) launch(p);
    CHECK(cudaStreamEndCapture(stream, &graph));
    CHECK(cudaGraphInstantiate(&exec, graph, 0));
    std::vector<float> times;
    for (int r = 0; r < kReps + 3; ++r) {
      CHECK(cudaMemsetAsync(flush, r, 64 << 20, stream));
      CHECK(cudaEventRecord(start, stream));
      CHECK(cudaGraphLaunch(exec, stream));
      CHECK(cudaEventRecord(stop, stream));
      CHECK(cudaEventSynchronize(stop));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      if (r >= 3) times.push_back(ms);  // the first replays warm up
    }
    CHECK(cudaGraphExecDestroy(exec));
    CHECK(cudaGraphDestroy(graph));
    std::sort(times.begin(), times.end());
    return times[times.size() / 2] * 1e3 / kPools;
  }

  // bench_decode.py's slots: N * T distinct random slots of max(512, 2 N T); the state is read from the first
  // token's (verify reads from one of its sequence's T slots, as num_accepted_tokens picks); also in order
  void set_slots(int N, int T) {
    const int slots = std::max(512, 2 * N * T);
    std::vector<int> perm(slots);
    for (int i = 0; i < slots; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), std::mt19937(N * 16 + T));
    std::vector<int> reads(N), tokens(N * T), reads_ordered(N), tokens_ordered(N * T);
    for (int i = 0; i < N * T; ++i) tokens[i] = perm[i], tokens_ordered[i] = i;
    for (int i = 0; i < N; ++i) reads[i] = tokens[i * T], reads_ordered[i] = tokens_ordered[i * T];
    CHECK(cudaMemcpy(read_slot, reads.data(), 4 * N, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(token_slots, tokens.data(), 4 * N * T, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(read_slot_ordered, reads_ordered.data(), 4 * N, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(token_slots_ordered, tokens_ordered.data(), 4 * N * T, cudaMemcpyHostToDevice));
  }

  template <int ELEM, int CTAS, int T, int STORE, bool INPUTS, int THREADS = 128>
  double run(int N, bool ordered = false, int dynamic_smem = 0) {
    auto kernel = move_step<ELEM, CTAS, T, STORE, INPUTS, THREADS>;
    if (dynamic_smem > 0) CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_smem));
    const int* reads = ordered ? read_slot_ordered : read_slot;
    const int* tokens = ordered ? token_slots_ordered : token_slots;
    return time_step([&](int p) {
      kernel<<<dim3(CTAS, kHeads, N), THREADS, dynamic_smem, stream>>>(pools[p], reads, tokens, inputs[p]);
    });
  }

  // The persistent movers: `per_sm` CTAs an SM (held there with dynamic shared memory); balanced: as many CTAs as
  // give each the same count of units (the last one fewer), not the full grid; dynamic: the full grid, each CTA
  // claiming its next unit from a counter.
  template <int ELEM, int CTAS, int T, int STORE, bool PREFETCH, int THREADS = 128>
  double run_persistent(int N, int per_sm, bool balanced, bool dynamic = false) {
    auto kernel = move_step_persistent<ELEM, CTAS, T, STORE, THREADS, PREFETCH>;
    const int smem = smem_for(per_sm);
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const int units = N * kHeads * CTAS, places = std::min(units, sms * per_sm);
    const int per_cta = (units + places - 1) / places;
    const int grid = balanced ? (units + per_cta - 1) / per_cta : places;
    return time_step([&](int p) {
      kernel<<<grid, THREADS, smem, stream>>>(pools[p], read_slot, token_slots, inputs[p], units,
                                             dynamic ? claimed + 2 * p : nullptr);
    });
  }
  int sms;
};

double copy_bandwidth(Bench& b) {  // bytes read + written a second by a 1 GiB device-to-device copy
  const size_t bytes = size_t{1} << 30;
  char *src, *dst;
  CHECK(cudaMalloc(&src, bytes));
  CHECK(cudaMalloc(&dst, bytes));
  std::vector<float> times;
  for (int i = 0; i < 13; ++i) {
    CHECK(cudaEventRecord(b.start, b.stream));
    CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, b.stream));
    CHECK(cudaEventRecord(b.stop, b.stream));
    CHECK(cudaEventSynchronize(b.stop));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, b.start, b.stop));
    if (i >= 3) times.push_back(ms);
  }
  CHECK(cudaFree(src));
  CHECK(cudaFree(dst));
  std::sort(times.begin(), times.end());
  return 2.0 * bytes / (times[times.size() / 2] * 1e-3);
}

// One row of a table: the case, its floor (the state bytes over `bandwidth`), each cell's µs and its ratio to the floor.
void print_row(int elem, int N, int T, double bandwidth, const std::vector<double>& cells) {
  const double floor_us = (T == 1 ? 2.0 : 1.0 + T) * N * kHeads * kStateElems * elem / bandwidth * 1e6;
  std::printf("| %s N=%d T=%d | %.1f |", elem == 2 ? "bf16" : "fp32", N, T, floor_us);
  for (double us : cells) std::printf(" %.1f (%.3f) |", us, us / floor_us);
  std::printf("\n");
}

template <int ELEM, int T>
void row(Bench& b, int N, double bandwidth) {
  b.set_slots(N, T);
  const std::vector<double> cells = {
      b.run<ELEM, 2, T, kStreaming, false>(N),
      b.run<ELEM, 2, T, kStreaming, true>(N),
      b.run<ELEM, 2, T, kPlain, true>(N),
      b.run<ELEM, 2, T, kStreaming, true>(N, false, smem_for(5)),  // 5 CTAs an SM, as the streamed decode build
      b.run<ELEM, 4, T, kStreaming, true>(N),
      b.run<ELEM, 1, T, kStreaming, true>(N),
      b.run<ELEM, 2, T, kStreaming, true>(N, true),
  };
  print_row(ELEM, N, T, bandwidth, cells);
}

// The second table: stores as our kernels store (final states plain, verify's per-token states streaming), with the
// step's inputs (bf16 states). At their registers (sm_90a) these movers run 10 CTAs an SM at 2 CTAs a head, 6 at 1 a
// head (5 for verify), 5 at 1 a head of 256 threads; the held columns give the residency of our builds: the streamed
// build 5 CTAs an SM, the token-outer build 6 (3 heads an SM), a verify at 1 CTA a head of 256 threads holding its
// rows in a 64 KB fp32 ring 3.
template <int ELEM, int T>
void occupancy_row(Bench& b, int N, double bandwidth) {
  b.set_slots(N, T);
  constexpr int kStore = T == 1 ? kPlain : kStreaming;
  const std::vector<double> cells = {
      b.run<ELEM, 2, T, kStore, true>(N),
      b.run<ELEM, 2, T, kStore, true>(N, false, smem_for(5)),
      b.run<ELEM, 2, T, kStore, true>(N, false, smem_for(6)),
      b.run<ELEM, 2, T, kStore, true>(N, false, smem_for(8)),
      b.run<ELEM, 1, T, kStore, true>(N),
      b.run<ELEM, 1, T, kStore, true, 256>(N),
      b.run<ELEM, 1, T, kStore, true, 256>(N, false, smem_for(3)),
  };
  print_row(ELEM, N, T, bandwidth, cells);
}

// The third table (benchmarks/NOTES.md, round 33): persistent grids (2 CTAs a head and 6 an SM unless named;
// "persistent" alone is the balanced grid), against the one-CTA-a-unit mover at the same residency.
template <int ELEM, int T>
void persistent_row(Bench& b, int N, double bandwidth) {
  b.set_slots(N, T);
  constexpr int kStore = T == 1 ? kPlain : kStreaming;
  const std::vector<double> cells = {
      b.run<ELEM, 2, T, kStore, true>(N, false, smem_for(6)),
      b.run_persistent<ELEM, 2, T, kStore, false>(N, 6, true),
      b.run_persistent<ELEM, 2, T, kStore, true>(N, 6, false),
      b.run_persistent<ELEM, 2, T, kStore, true>(N, 6, true),
      b.run_persistent<ELEM, 2, T, kStore, true>(N, 6, false, true),
      b.run_persistent<ELEM, 2, T, kStore, true>(N, 4, true),
      b.run_persistent<ELEM, 1, T, kStore, true, 256>(N, 3, true),
  };
  print_row(ELEM, N, T, bandwidth, cells);
}

}  // namespace

int main(int argc, char** argv) {
  Bench b;
  CHECK(cudaStreamCreate(&b.stream));
  CHECK(cudaDeviceGetAttribute(&b.sms, cudaDevAttrMultiProcessorCount, 0));
  CHECK(cudaEventCreate(&b.start));
  CHECK(cudaEventCreate(&b.stop));
  CHECK(cudaMalloc(&b.flush, 64 << 20));
  const size_t pool_bytes = size_t{kMaxSlots} * kHeads * kStateElems * 2;  // bf16 at 2048 slots, fp32 at 1024
  b.pools.resize(kPools);
  b.inputs.resize(kPools);
  const size_t input_bytes = size_t{kMaxTokens} * kHeads * 128 * 2;
  for (int p = 0; p < kPools; ++p) {
    CHECK(cudaMalloc(&b.pools[p], pool_bytes));
    CHECK(cudaMemset(b.pools[p], 1, pool_bytes));
    void* buffers[5];
    for (void*& buffer : buffers) {
      CHECK(cudaMalloc(&buffer, input_bytes));
      CHECK(cudaMemset(buffer, 1, input_bytes));
    }
    b.inputs[p] = {static_cast<const uint2*>(buffers[0]), static_cast<const uint2*>(buffers[1]),
                   static_cast<const uint2*>(buffers[2]), static_cast<const uint2*>(buffers[3]),
                   static_cast<uint2*>(buffers[4])};
  }
  for (int** slots : {&b.read_slot, &b.token_slots, &b.read_slot_ordered, &b.token_slots_ordered}) {
    CHECK(cudaMalloc(slots, 4 * kMaxTokens));
  }
  CHECK(cudaMalloc(&b.claimed, 2 * sizeof(int) * kPools));
  CHECK(cudaMemset(b.claimed, 0, 2 * sizeof(int) * kPools));
  const double measured = copy_bandwidth(b);
  const double bandwidth = argc > 1 ? std::atof(argv[1]) * 1e12 : measured;
  std::printf("copy bandwidth: 1 GiB cudaMemcpyAsync %.3f TB/s; floor from %.3f TB/s\n\n", measured / 1e12,
              bandwidth / 1e12);
  std::printf("| case | floor µs | state only | + inputs | + inputs, plain stores | + inputs, 5 CTAs an SM | "
              "+ inputs, 4 CTAs a head | + inputs, 1 CTA a head | + inputs, slots in order |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  row<2, 1>(b, 32, bandwidth);
  row<2, 1>(b, 128, bandwidth);
  row<2, 1>(b, 256, bandwidth);
  row<2, 1>(b, 1024, bandwidth);
  row<4, 1>(b, 128, bandwidth);
  row<2, 4>(b, 64, bandwidth);
  row<4, 4>(b, 64, bandwidth);
  row<2, 8>(b, 64, bandwidth);
  std::printf("\n| case | floor µs | 2 a head | 2 a head, 5 an SM | 2 a head, 6 an SM | 2 a head, 8 an SM | 1 a head | "
              "1 a head, 256 threads | 1 a head, 256 threads, 3 an SM |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  occupancy_row<2, 1>(b, 128, bandwidth);
  occupancy_row<2, 1>(b, 256, bandwidth);
  occupancy_row<2, 4>(b, 64, bandwidth);
  std::printf("\n| case | floor µs | 1 a unit, 2 a head, 6 an SM | persistent, no prefetch | persistent, prefetch, "
              "full grid | persistent, prefetch | persistent, prefetch, dynamic | persistent, prefetch, 4 an SM | persistent, prefetch, 1 a head, 256 "
              "threads, 3 an SM |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  persistent_row<2, 1>(b, 128, bandwidth);
  persistent_row<2, 4>(b, 64, bandwidth);
  CHECK(cudaGetLastError());
  return 0;
}
