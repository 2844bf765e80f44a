"""sparsestart.runtime: keeping freed memory in the process (glibc mallopt)."""
import subprocess
import sys
import textwrap

import pytest

from sparsestart import runtime

GLIBC = runtime._libc() is not None

# Allocate and free a 40 MiB tensor 50 times; print the minor page faults this caused. (40 MiB is
# above the 32 MiB glibc's dynamic mmap threshold can reach, so its default maps every one afresh.)
_CHILD = textwrap.dedent("""
    import resource, sys, torch
    from sparsestart import runtime
    if sys.argv[1] == "retain":
        assert runtime.retain_freed_memory()
    x = torch.empty(10 << 20)
    x.fill_(1.0)
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        x = torch.empty(10 << 20)  # 40 MiB
        x.fill_(1.0)              # touch every page
        del x
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(policy: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, policy], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="needs glibc's mallopt")
def test_retained_memory_stops_page_faults_on_repeated_buffers():
    default, retained = _faults("default"), _faults("retain")
    pages = 50 * (40 << 20) // 4096
    assert default > pages // 2, f"glibc's default should page-fault fresh 40 MiB buffers ({default} faults)"
    # A few buffers' worth (heap growth), not one per allocation.
    assert retained < pages // 5, f"retained memory should be reused without faults ({retained} faults)"


@pytest.mark.skipif(not GLIBC, reason="needs glibc's mallopt")
def test_settings_are_recorded():
    assert runtime.retain_freed_memory(mmap_threshold=64 << 20, trim_threshold=1 << 40)
    assert runtime.malloc_settings() == {"policy": "retain_freed_memory", "mmap_threshold": 64 << 20,
                                         "trim_threshold": 2**31 - 1}
    assert runtime.retain_freed_memory()  # back to the defaults the trainer and the benchmarks use


@pytest.mark.parametrize("kw", [{"mmap_threshold": 0}, {"trim_threshold": -5}, {"mmap_threshold": 1.5},
                                {"trim_threshold": True}])
def test_bad_thresholds_are_named(kw):
    (name, value), = kw.items()
    with pytest.raises(ValueError, match=f"{name} must be a positive number of bytes, got {value!r}"):
        runtime.retain_freed_memory(**kw)
