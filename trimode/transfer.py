"""Host lists onto the device without waiting for it.

`torch.tensor(values, device="cuda")` copies from pageable memory, and a blocking copy waits for
everything already queued on the stream: one per step would wait for the passes in flight, which
is what the engine's async steps (decoding/ar.py) and CUDA graphs (builder/pass_graphs.py) exist to
avoid. `to_device` stages the values in pinned memory and copies them asynchronously, in stream
order (torch's pinned allocator keeps the staging buffer until the copy is done). On CPU it is
torch.tensor.
"""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
