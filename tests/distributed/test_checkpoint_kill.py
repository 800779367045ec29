"""kill -9 during a checkpoint save: the next start resumes from the previous complete one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_longvita.checkpoint.dist import latest_iteration
from tests.harness import free_port

STEPS, INTERVAL = 8, 4


def _launch(checkpoint_dir: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "LONGVITA_PLATFORM": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megatron_longvita.training.synthetic",
            "--steps",
            str(STEPS),
            "--checkpoint-dir",
            str(checkpoint_dir),
            "--save-interval",
            str(INTERVAL),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path: Path) -> None:
    staging = tmp_path / f"iter_{STEPS:07d}.tmp"
    job = _launch(tmp_path)
    deadline = time.monotonic() + 120
    while not staging.exists():  # the final save has started writing
        assert job.poll() is None, f"run ended before its last save could be interrupted:\n{job.stdout.read()}"
        assert time.monotonic() < deadline, "the last save never started"
        time.sleep(0.002)
    os.killpg(job.pid, signal.SIGKILL)  # the trainer and dist_checkpointing's writer processes
    job.wait()
    assert latest_iteration(str(tmp_path)) == INTERVAL
    assert not (tmp_path / f"iter_{STEPS:07d}").exists()

    resumed = _launch(tmp_path)
    output, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, output
    assert f"resumed from {tmp_path / f'iter_{INTERVAL:07d}'}" in output
    assert latest_iteration(str(tmp_path)) == STEPS
    assert not staging.exists()
