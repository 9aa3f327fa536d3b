"""llm.allocator: importing llm keeps large freed blocks in the process (no mmap, no trim), and
return_freed_memory undoes it for a process that measures memory. Each check in a fresh process,
since mallopt's settings are process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A training step's shape in small: a 32 MB logits block and its softmax, made and freed each
# round. Prints the page faults of the last three rounds, once the heap has settled.
ROUNDS = """
import resource
import llm
{setup}
import torch
x, w = torch.randn(1024, 256), torch.randn(8192, 256)
for round in range(10):
    if round == 7:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    logits = x @ w.T
    probs = logits.softmax(-1)
    del logits, probs
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 3 * 2 * 1024 * 8192 * 4 // 4096   # the pages those three rounds touch


def faults(setup: str = "", **env: str) -> int:
    out = subprocess.run([sys.executable, "-c", ROUNDS.format(setup=setup)], capture_output=True, text=True,
                         check=True, env={**os.environ, **env})
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_importing_llm_keeps_freed_blocks_and_the_switch_and_return_freed_memory_undo_it():
    assert faults("assert llm.keep_freed_memory()") < PAGES // 20      # the heap's pages, reused
    assert faults("assert not llm.keep_freed_memory()", LLM_KEEP_FREED_MEMORY="0") > PAGES // 2
    # Measuring memory: each large block its own mapping again, faulted afresh every round.
    assert faults("from llm.allocator import return_freed_memory; assert return_freed_memory()") > PAGES // 2
