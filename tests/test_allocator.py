"""keep_freed_memory: a step's freed buffers are reused, not faulted in again from the kernel."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Minor page faults per "step" of a training-like pattern: buffers of several sizes, one of them
# past glibc's largest mmap threshold (32 MiB) like a GPT's attention scores, alive together,
# all freed at the end. In a fresh process, since the setting is process-wide.
PROGRAM = """
import json, resource, sys, torch
from lipschitz_lightning.commands.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_step = []
for _ in range(8):
    before = faults()
    blocks = [torch.ones(mib * 2**18) for mib in (1, 3, 6, 12, 48, 3, 1, 6)]
    del blocks
    per_step.append(faults() - before)
print(json.dumps({"applied": applied, "faults": per_step}))
"""


def page_faults(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_after_the_first_step():
    default, kept = page_faults("default"), page_faults("keep")
    assert kept["applied"] is True
    pages_per_step = 80 * 2**20 // 4096  # the 80 MiB the pattern touches
    # from the third step on: glibc's own policy keeps unmapping and trimming (here ~19,000 fresh
    # pages every step, for good); with no mmap and no trimming, the first steps' memory is reused
    assert sum(default["faults"][2:]) > pages_per_step
    # (over those six steps less than one step's worth: glibc may still grow the heap once for a
    # block it cannot fit among the freed ones, seen here as one 48 MiB step)
    assert sum(kept["faults"][2:]) < pages_per_step
