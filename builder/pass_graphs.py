"""CUDA graphs of the torch backend's passes, one per (pass kind, chunk length, batch bucket, span bucket).

On a GPU a decode pass of an AOTInductor program is a few hundred kernel launches, each some
microseconds of host time: for a small model that is most of the step. Replaying a captured CUDA
graph launches them all at once. A graph replays fixed shapes at fixed addresses, so:
- every pass reads static input buffers (tokens, lengths, block tables, logit index) that the host
  fills before the replay; the KV pool's tensors stay put for the engine's life;
- b rows run in the graph of the smallest bucket B >= b (1, 2, 4, .., max_slots). Its B - b padding
  rows have length 0 and tables of the null block, so they write their K/V into the null block (the
  pool's scratch, never read as committed K/V: kv_cache.py) and attend only to it;
- the span of keys is a bucket too (64, 128, 256, .. max_seq_len): keys past a row's visible end
  are masked, so a longer span gives the same results (as torch_backend.SPAN_ALIGN's rounding).
Prefill chunks (any length) run their program directly. A graph is captured the first time its key
runs; all share one memory pool, and a replay's outputs are copied out at once, as the next replay
may reuse that memory. Another pool (a new Engine's) drops the graphs.

On CPU there is nothing to capture: `TRIMODE_PASS_GRAPHS=1` runs the same buffers, padding and
buckets synchronously, so the tests cover every line but the capture. `TRIMODE_PASS_GRAPHS=0` turns
graphs off on CUDA (the default there is on).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch

from trimode.decoding.settings import env_switch
from trimode.kv_cache import KVCache
from trimode.passes import PassKind
from trimode.transfer import to_device

WARMUP_RUNS = 2  # runs on a side stream before a capture (lazy initialisation must not be captured)
MIN_SPAN = 64


def use_graphs(device: torch.device) -> bool:
    """Whether the torch backend runs its passes through PassGraphs: TRIMODE_PASS_GRAPHS=1 / 0, else on CUDA."""
    return env_switch("TRIMODE_PASS_GRAPHS", device.type == "cuda")


def buckets(largest: int, smallest: int = 1) -> list[int]:
    """smallest, 2 smallest, 4 smallest, .. below largest, then largest."""
    sizes = []
    while smallest < largest:
        sizes.append(smallest)
        smallest *= 2
    return [*sizes, largest]


def bucket(size: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= size)


# program(inputs) -> outputs: a loaded package's boxed call; inputs as CompiledBackend.inputs orders them
Program = Callable[[list[torch.Tensor]], list[torch.Tensor]]


class PassGraphs:
    def __init__(self, device: torch.device, max_seq_len: int):
        self.device, self.max_seq_len = device, max_seq_len
        self.capture = device.type == "cuda"
        self.spans = buckets(max_seq_len, min(MIN_SPAN, max_seq_len))
        self.graphs: dict[tuple, tuple] = {}  # key -> (replay, outputs)
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}  # chunk length -> static inputs
        self._pool: weakref.ref | None = None  # the pool the graphs and buffers are of
        self.memory = torch.cuda.graph_pool_handle() if self.capture else None  # the graphs' shared memory pool

    def span(self, needed: int) -> int:
        return bucket(needed, self.spans)

    def run(
        self,
        kind: PassKind,
        program: Program,
        tokens: torch.Tensor,
        pool: KVCache,
        slots: list[int],
        lengths: list[int],
        logit_index: torch.Tensor,
        constants: list[torch.Tensor],
        span: int,
    ) -> list[torch.Tensor]:
        """One pass of `program` over tokens [b, L] in the graph of its key (captured on first use):
        the static buffers filled, b rows padded to the bucket, the outputs' first b rows copied out.
        constants: the inputs after the span's key index (the pattern flag, the pool's K and V)."""
        self._check_pool(pool)
        b, L = tokens.shape
        rows = bucket(b, buckets(pool.num_slots))
        key = (kind, L, rows, span)
        buffers = self._buffers(L, pool)
        buffers["tokens"][:b].copy_(tokens)
        buffers["lengths"][:b].copy_(to_device(lengths, self.device))
        buffers["tables"][:b].copy_(pool.slot_tables(slots))
        buffers["logit_index"][:b].copy_(logit_index)
        if rows > b:  # padding rows: length 0 in the null block
            buffers["tokens"][b:rows].zero_()
            buffers["lengths"][b:rows].zero_()
            buffers["tables"][b:rows].fill_(pool.null_block)
            buffers["logit_index"][b:rows].zero_()
        if key not in self.graphs:
            inputs = [
                buffers["tokens"][:rows],
                buffers["lengths"][:rows],
                buffers["tables"][:rows],
                buffers["key_index"][:span],
                buffers["logit_index"][:rows],
                *constants,
            ]
            self.graphs[key] = self._capture(program, inputs)
        replay, outputs = self.graphs[key]
        replay()
        return [out[:b].clone() if out.dim() else out.clone() for out in outputs]

    def _check_pool(self, pool: KVCache) -> None:
        """A graph holds the addresses of the pool's tensors, which stay put for the pool's life: another
        pool (another Engine's) starts afresh. Known by a weak reference, not an id(), which a new pool
        may reuse, and not the tensors' addresses, a call per layer on every pass."""
        if self._pool is None or self._pool() is not pool:
            self.graphs.clear()
            self.buffers.clear()
            self._pool = weakref.ref(pool)

    def _buffers(self, L: int, pool: KVCache) -> dict[str, torch.Tensor]:
        """The static inputs of the graphs of chunk length L, max_slots rows (a bucket's: the first rows)."""
        if L not in self.buffers:
            slots, device = pool.num_slots, self.device
            self.buffers[L] = {
                "tokens": torch.zeros(slots, L, dtype=torch.long, device=device),
                "lengths": torch.zeros(slots, dtype=torch.long, device=device),
                "tables": torch.full_like(pool.block_tables, pool.null_block),
                "key_index": torch.arange(self.max_seq_len, device=device),
                "logit_index": torch.zeros(slots, dtype=torch.long, device=device),
            }
        return self.buffers[L]

    def _capture(self, program: Program, inputs: list[torch.Tensor]) -> tuple:
        """-> (replay, outputs): a captured graph and the tensors it writes (CUDA), or a call of the
        program on the same buffers whose outputs are the latest call's (CPU, or after a capture failed)."""
        if self.capture:
            try:
                return self._record(program, inputs)
            except RuntimeError as e:  # a program that cannot be captured still runs, without graphs
                self.capture = False
                warnings.warn(f"CUDA graph capture failed, passes run without graphs: {str(e).splitlines()[0]}")
        outputs: list[torch.Tensor] = []

        def run_now() -> None:
            outputs[:] = program(list(inputs))

        return run_now, outputs

    def _record(self, program: Program, inputs: list[torch.Tensor]) -> tuple:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                program(list(inputs))
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory):
            captured = program(list(inputs))
        return graph.replay, captured
