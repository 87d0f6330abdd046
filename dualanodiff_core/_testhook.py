"""Test hook: pause at a named point so a test can kill the process there (kill-and-rerun tests).

Set ``DUALANODIFF_TEST_PAUSE=<point>[,<point>...]`` and ``DUALANODIFF_TEST_PAUSE_FILE=<path>``: when the process
reaches one of the named points it writes the point's name to that file and sleeps (up to
``DUALANODIFF_TEST_PAUSE_SECONDS``, default 60), so the test sees where it is and sends ``SIGKILL``. With a number
of seconds set the process continues afterwards (e.g. to delay the first writer inside the lock step). Unset (always,
outside the tests) it costs one environment lookup. With ``DUALANODIFF_TEST_PAUSE_RANK=<r>`` only the process with
``RANK`` r (as torchrun sets it) pauses, so a test can stop one process of several at a point all of them pass.

Points: ``lock`` (the dataset lock is held, its owner record not yet written), ``sample_commit`` (a sample's files are
partly renamed into place), ``manifest_line`` (a sample's files are in place, its manifest line not yet written),
``atomic_write`` (a temp file is written, not yet renamed onto its target), ``checkpoint_write`` (a training
checkpoint is in its temp file), ``shard_staged`` (a process of a sharded generation has just staged one sample).
"""

from __future__ import annotations

import os
import time


def pause(point: str) -> None:
    wanted = os.environ.get("DUALANODIFF_TEST_PAUSE")
    if not wanted or point not in wanted.split(","):
        return
    only = os.environ.get("DUALANODIFF_TEST_PAUSE_RANK")
    if only and only != os.environ.get("RANK", "0"):
        return
    flag = os.environ.get("DUALANODIFF_TEST_PAUSE_FILE")
    if flag:
        with open(flag, "a", encoding="utf-8") as f:
            f.write(point + "\n")
    time.sleep(float(os.environ.get("DUALANODIFF_TEST_PAUSE_SECONDS", "60")))
