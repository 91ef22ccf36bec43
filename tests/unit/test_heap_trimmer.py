"""ops.memory.HeapTrimmer: freed C heap goes back to the system (docs/reliability.md, probes 1-2)."""

from jrouter.ops.memory import HeapTrimmer


def rss_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_freed_backlog_goes_back_once_and_only_once():
    trimmer = HeapTrimmer()
    assert trimmer.available                           # Debian's glibc has mallinfo2 (2.33+)
    trimmer.check()
    backlog = [bytes(2000) for _ in range(40000)]      # ~80 MiB in the C heap
    keep = [bytes(600) for _ in range(200)]            # a few live ones after it
    grown = rss_mib()
    del backlog
    assert rss_mib() > grown - 8                       # freed, but glibc keeps it
    assert trimmer.check() is True
    assert rss_mib() < grown - 60
    assert trimmer.check() is False                    # nothing new freed: no second trim
    assert trimmer.trims == 1 and keep


def test_small_frees_do_not_trim():
    trimmer = HeapTrimmer()
    trimmer.check()
    small = [bytes(2000) for _ in range(1000)]         # 2 MiB, under the 4 MiB threshold
    del small
    assert trimmer.check() is False
