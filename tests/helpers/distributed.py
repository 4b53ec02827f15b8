"""Running a command line under ``torchrun`` in a test: two processes on the CPU, a free port picked by
torchrun itself (``--standalone``), and a process that hangs reported with every process' Python stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HANG_SECONDS = 300  # a tiny run takes seconds; this only bounds a hang, which is then reported, not waited out
STACK_SECONDS = 5  # for the workers' faulthandler to write their stacks after SIGABRT


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux ``/proc``), deepest last."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            kids = [int(k) for k in task.read_text().split()]
            found += kids
            pending += kids
    return found


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = HANG_SECONDS) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc script args`` with one OpenMP thread per process.

    A run still going after ``timeout`` seconds fails the test with the Python stack of every process
    (``faulthandler`` on SIGABRT) and the end of their output, instead of waiting forever.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = _children(process.pid)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
        time.sleep(STACK_SECONDS)
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"torchrun still running after {timeout:.0f} s ({len(workers)} processes under it); their "
                             f"stacks and output:\n{stderr[-12000:]}\n--- stdout ---\n{stdout[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
