"""Writing a record never opens a window in which the process umask is 0: another thread of the same
process (the sweep's lease renewal, the worker log's tee) creating a file at that moment would make it
world-readable, even under privacy=strict."""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path

from src import results


def test_files_made_by_another_thread_while_records_are_written_keep_the_umask(tmp_path):
    made = tmp_path / "made"
    made.mkdir()
    stop = threading.Event()

    def create() -> None:
        i = 0
        while not stop.is_set():
            with open(made / str(i), "w"):
                pass
            i += 1

    old_mask, old_switch = os.umask(0o077), sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: any window is hit
    thread = threading.Thread(target=create)
    thread.start()
    try:
        for i in range(3000):
            results.atomic_write_json(tmp_path / "record.json", {"i": i})
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_switch)
        os.umask(old_mask)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in made.iterdir()}
    assert len(list(made.iterdir())) > 100 and modes == {0o600}
    assert stat.S_IMODE((tmp_path / "record.json").stat().st_mode) == 0o600


def test_the_umask_is_read_not_changed():
    old = os.umask(0o027)
    try:
        assert results._umask() == 0o027  # noqa: SLF001
        assert Path("/proc/self/status").read_text().count("Umask:\t0027") == 1
    finally:
        os.umask(old)
