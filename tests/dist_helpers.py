"""Starting small torchrun jobs from the tests: 2 CPU processes (gloo), one thread each, this worktree's ebmfast on
the children's path, and a time-out on everything so that nothing can hang CI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def job_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def torchrun(*args: str, nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a torchrun job to completion (``subprocess.TimeoutExpired`` after ``timeout`` seconds)."""
    return subprocess.run(
        torchrun_cmd(*args, nproc=nproc),
        cwd=ROOT,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_worker(out: Path, max_iterations: int, *extra: str, nproc: int = 2, timeout: float = 180):
    """tests/dist_worker.py on ``nproc`` ranks; returns the per-rank dumps (OUT/rank{r}.pt)."""
    import torch

    proc = torchrun(str(WORKER), "--out", str(out), "--max-iterations", str(max_iterations), *extra, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def start(*args: str, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        torchrun_cmd(*args, nproc=nproc),
        cwd=ROOT,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def worker_pids(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the torchrun agent's worker processes (from /proc: parent pid and the RANK variable)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            text = (entry / "environ").read_bytes().decode(errors="replace")
            env = dict(kv.split("=", 1) for kv in text.split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(entry.name)
    return ranks


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the job exited (rc {proc.returncode}) before {what}: {proc.stdout.read()[-4000:]}")
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"no {what} after {timeout} s")


def steps_logged(metrics_csv: Path) -> int:
    return metrics_csv.read_text().count(",loss,") if metrics_csv.exists() else 0


def stop(proc: subprocess.Popen) -> None:
    """Kill a job that a failed test left running (the agent's process group, workers included)."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    for pid in worker_pids(proc.pid).values():
        try:
            os.kill(pid, 9)
        except OSError:
            pass
