"""runtime/lifetime.py: a process started through it dies with its parent (Linux PR_SET_PDEATHSIG),
even when it runs in a session of its own, as torchrun's workers do; without it, it survives."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _orphan_after_parent_killed(through_lifetime: bool) -> bool:
    parent = textwrap.dedent(f"""
        import subprocess, sys
        from acmoe_megatron.runtime.lifetime import wrapped
        cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
        child = subprocess.Popen(wrapped(cmd) if {through_lifetime} else cmd, start_new_session=True)
        print(child.pid, flush=True)
        child.wait()
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    time.sleep(0.5)  # the child has exec'd
    proc.kill()
    proc.wait()
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    return alive


def test_a_child_in_its_own_session_dies_with_its_parent():
    assert not _orphan_after_parent_killed(through_lifetime=True)


def test_without_it_the_child_outlives_a_killed_parent():
    assert _orphan_after_parent_killed(through_lifetime=False)  # what torchrun's workers did
