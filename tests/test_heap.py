"""Freed activations stay in glibc's heap during generation and go back to the system after it.

Each case runs in a fresh interpreter: the thresholds are process-wide and a streamed model pins them for good.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")

PRELUDE = """
import resource, torch
import rectiflux.runtime.heap as heap

def faults_of_a_fresh_48_mib_tensor():
    torch.empty(16 << 20).fill_(1.0)  # 64 MiB freed just before: room for it in a heap that kept it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(12 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
"""


def run(body: str, **env: str) -> str:
    script = PRELUDE + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_freed_memory_is_reused_and_released():
    out = run("""
        glibc = faults_of_a_fresh_48_mib_tensor()  # above the mmap threshold: fresh zero pages every time
        heap.keep_freed_memory("cpu")
        kept = faults_of_a_fresh_48_mib_tensor()
        held = resident_mib()
        heap.release()
        print(glibc, kept, held - resident_mib())
    """)
    glibc, kept, released = out.split()
    assert int(glibc) > 10_000 and int(kept) < 100  # 12288 pages of 4 KiB, or none
    assert float(released) > 50  # the freed 64 MiB left the process


def test_streaming_pins_the_threshold_and_the_switch_turns_it_off():
    out = run("""
        heap.keep_freed_memory("cpu")
        heap.return_freed_memory_to_the_system()
        heap.keep_freed_memory("cpu")  # too late: the streamed model's choice stands
        print(faults_of_a_fresh_48_mib_tensor())
    """)
    assert int(out) > 10_000
    assert int(run("""
        heap.keep_freed_memory("cpu")
        print(faults_of_a_fresh_48_mib_tensor())
    """, RECTIFLUX_KEEP_FREED_MEMORY="0")) > 10_000
    assert int(run("""
        heap.keep_freed_memory("meta")
        print(faults_of_a_fresh_48_mib_tensor())
    """)) > 10_000


def test_a_generation_keeps_then_releases():
    out = run("""
        import rectiflux
        pipe = rectiflux.load()
        calls = []
        release = heap.release
        heap.release = lambda: (calls.append(heap._mode), release())
        pipe("a red circle", seed=0, num_inference_steps=2)
        try:
            pipe("a red circle", seed=0, num_inference_steps=2, height=12)
        except ValueError:
            pass
        print(" ".join(calls))
    """)
    assert out == "keep keep"  # the pipeline call switched it on; both generations released, the failed too


def test_weights_read_into_a_keeping_heap_take_their_own_mappings():
    # a lazily read block's weights outlive the call; in their own mapping they neither split the freed memory the
    # activations reuse nor stay behind in the heap once freed. Whether that lowers a peak depends on the heap's
    # history, so this checks the mechanism: where glibc puts the memory (mallinfo2's bytes in mappings)
    out = run("""
        import ctypes
        class Mallinfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                              "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Mallinfo2
        def mapped_mib():
            return libc.mallinfo2().hblkhd / 2**20
        heap.keep_freed_memory("cpu")
        before = mapped_mib()
        with heap.weights_in_their_own_mappings():
            weight = torch.empty(8 << 20).fill_(1.0)  # 32 MiB
        own = mapped_mib() - before
        activation = torch.empty(8 << 20).fill_(1.0)
        after = mapped_mib() - before
        del weight
        print(own, after, mapped_mib() - before, faults_of_a_fresh_48_mib_tensor())
    """)
    own, after, freed, faults = map(float, out.split())
    assert own >= 32 and after == own  # the weight is a mapping of its own; the activation after it is in the heap
    assert freed < 1  # freeing the weight unmapped it
    assert faults < 100  # still keeping afterwards
