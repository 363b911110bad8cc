"""Run a worker script in 2 CPU processes with `accelerate launch`, as the multi-process tests do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


LEAKED_PREFIXES = ("ACCELERATE_", "FSDP_", "MASTER_", "TORCHELASTIC_")
LEAKED_KEYS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK"}


def _descendants(pid: int) -> list:
    import psutil  # an accelerate dependency

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(
    *program: str | Path, env: dict[str, str] | None = None, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 PROGRAM...` on the CPU (one thread per process, a free
    port): a script and its arguments, or ``"-m", module, ...``. `env` adds variables. With `check`, a non-zero
    exit fails the test with the end of both outputs."""
    # In-process tests leave accelerate/torch.distributed variables in os.environ (ACCELERATE_*, FSDP_*,
    # MASTER_PORT, RANK...); inherited, they reconfigure or stall the workers, so they are dropped.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(LEAKED_PREFIXES) and k not in LEAKED_KEYS}
    full_env = {
        **inherited,
        "ACCELERATE_USE_CPU": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *map(str, program),
    ]
    launcher = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchelastic starts the workers in sessions of their own, and a worker defers SIGTERM to the end of its
        # step (which a stalled collective never reaches): kill the launcher and every worker, or they live on,
        # holding the port and the output pipes
        workers = _descendants(launcher.pid)
        launcher.kill()
        for worker in workers:
            try:
                worker.kill()
            except Exception:  # psutil.NoSuchProcess: it ended meanwhile
                pass
        stdout, stderr = launcher.communicate()
        raise AssertionError(
            f"{' '.join(map(str, program))}: no exit after {timeout} s (killed)\n{stdout[-4000:]}{stderr[-12000:]}"
        ) from None
    proc = subprocess.CompletedProcess(cmd, launcher.returncode, stdout, stderr)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-12000:]
    return proc
