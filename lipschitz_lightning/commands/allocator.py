"""What a run sets process-wide for the CPU's speed, from its entry point: host memory that stays with
the process between steps (``keep_freed_memory``), subnormal floats flushed (``flush_subnormals``).

Host memory.

glibc's malloc serves every block above its mmap threshold (128 KiB at start, raised on the fly
at most to 32 MiB) with a fresh ``mmap`` and unmaps it on free, and returns the freed top of its
heap to the system past a trim threshold. A training step allocates and frees the same
activations, gradients and Newton-Schulz temporaries every time, so each step faulted its pages
in anew and the kernel zeroed them. Measured on a 2-core CPU: the default CIFAR MLP, 300 steps,
about a million page faults and 5 ms of a ~70 ms step; the Shakespeare GPT, whose attention
scores (64 MiB) are past any mmap threshold, 2.8-3.2 million faults in a 16-step benchmark. With
no block mmapped and no trimming, the blocks are reused: 134,000 and 0.6 million faults, nearly
all of them start-up.

jemalloc or tcmalloc through ``LD_PRELOAD`` do the same from outside the process (Intel's
PyTorch CPU tuning guide recommends them); this needs no extra library and no change to how a
run is started. The cost is that a process keeps its peak host memory until it exits, as
PyTorch's CUDA caching allocator does on a GPU. Elsewhere than glibc (macOS, musl, Windows) it
does nothing.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt's parameter numbers, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"
NO_TRIMMING = -1


def keep_freed_memory() -> bool:
    """Make glibc reuse freed blocks instead of unmapping them; True where that was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; both are set, even if the first is refused. Without mmap,
    # glibc still maps memory where the heap cannot grow, so no allocation fails for this.
    applied = [mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, NO_TRIMMING)]
    return all(result == 1 for result in applied)


def flush_subnormals() -> bool:
    """Floats below float32's (float64's) smallest normal number become 0, in every operation of this
    process (the CPU's flush-to-zero and denormals-are-zero modes, ``torch.set_flush_denormal``).

    Why: x86 cores compute with subnormal operands many times slower. Newton-Schulz raises
    Frobenius-normalised matrices to the fifth power, so small entries of a momentum buffer or a
    weight underflow into the subnormal range: the certified MLP (``experiment=cifar_mlp_certified``)
    ran its first 1000 steps at 14-16 steps/s and then about 2.5 (measured by the issue's profile;
    docs/speed.md has this machine's numbers). Flushed, it keeps its speed. Safe for the guarantees:
    a flushed value is below 1.2e-38 (2.2e-308 in float64), and every bound is computed from the
    weights as they are (exact norms, in float64), so a flush cannot make one wrong; Newton-Schulz's
    proven largest singular value is unaffected by setting tiny entries to 0 up to that size.
    Returns whether the CPU supports it (True on x86 with SSE3)."""
    import torch

    return bool(torch.set_flush_denormal(True))
