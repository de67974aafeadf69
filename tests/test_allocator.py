"""The in-process malloc setting: after it, a large block comes from the heap, not from its own mmap."""

import platform

import pytest

from tests.conftest import run_python

PROBE = """
import sys
from gpt2_pretrain.allocator import keep_large_allocations_on_heap

def own_mappings(size):
    # anonymous mappings at least `size` bytes long, outside the heap
    count = 0
    with open('/proc/self/maps') as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split('-'))
            if len(fields) < 6 and end - start >= size:
                count += 1
    return count

size = 256 * 2**20
if sys.argv[1] == 'on':
    assert keep_large_allocations_on_heap()
before = own_mappings(size)
block = bytearray(size)
print(own_mappings(size) - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_block_comes_from_the_heap_once_set():
    default = run_python(["-c", PROBE, "off"], timeout=60)
    tuned = run_python(["-c", PROBE, "on"], timeout=60)
    assert default.returncode == 0 and tuned.returncode == 0, default.stderr + tuned.stderr
    assert default.stdout.strip() == "1"  # glibc's default: the block is an mmap of its own
    assert tuned.stdout.strip() == "0"
