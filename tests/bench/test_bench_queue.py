"""scripts/bench-queue.sh: the detached runner that works through a queue file of quality.py steps.

The script is run in a copy of the repository layout whose `.venv/bin/python` is a stand-in that
records its arguments and fails for one config, so the test sees exactly what each queue line
becomes, that a failing step's real exit status is logged and that the queue goes on after it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench-queue.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../../calls.txt"
echo "output of $*"
case "$*" in *configs/broken.yaml*) echo "broken config" >&2; exit 3;; esac
exit 0
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    if shutil.which("bash") is None or shutil.which("nice") is None:
        pytest.skip("needs bash and nice")
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "bench-queue.sh")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def run_queue(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(tree / "scripts" / "bench-queue.sh"), *args],
                          cwd=tree, capture_output=True, text=True, timeout=60)


def test_each_line_becomes_one_resumable_step_and_a_failure_does_not_stop_the_queue(tree: Path):
    queue = tree / "q1.queue"
    queue.write_text("# a comment\n\n"
                     "study_x x4 lora,pissa parts/a\n"
                     "broken x4 dora parts/b\n"
                     "  \n"
                     "study_x x4 GATHER gather_x4\n")
    done = run_queue(tree, str(queue))
    assert done.returncode == 0, done.stderr

    calls = (tree / "calls.txt").read_text().splitlines()
    common = "bench/quality.py --config bench/configs/{}.yaml --budget x4 --threads 1 --resume"
    assert calls == [
        common.format("study_x") + " --methods lora,pissa --output parts/a",
        common.format("broken") + " --methods dora --output parts/b",
        common.format("study_x") + " --gather",
    ]

    logs = tree / "runs" / "queue"
    assert (logs / "parts" / "a.log").read_text() == f"output of {calls[0]}\n"
    assert "broken config" in (logs / "parts" / "b.log").read_text()  # stderr goes to the step's log
    assert (logs / "gather_x4.log").read_text() == f"output of {calls[2]}\n"

    chain = (logs / "q1.chain").read_text().splitlines()
    ends = [line.split(" ", 1)[1] for line in chain if " end " in line]
    assert ends == ["end rc=0 parts/a", "end rc=3 parts/b", "end rc=0 gather_x4"]
    starts = [line for line in chain if " start " in line]
    assert len(starts) == 3 and starts[0].endswith(" start nice .venv/bin/python " + calls[0])


def test_the_queue_is_read_once_when_it_starts(tree: Path):
    """Editing a queue file while its runner works must not add or move steps of that runner."""
    queue = tree / "q2.queue"
    queue.write_text("study_x x8 lora parts/first\nstudy_x x8 full parts/second\n")
    fake = tree / ".venv" / "bin" / "python"
    fake.write_text(FAKE_PYTHON.replace("exit 0\n", f'echo "study_x x8 dora parts/added" >> {queue}\nexit 0\n'))
    assert run_queue(tree, str(queue)).returncode == 0
    calls = (tree / "calls.txt").read_text().splitlines()
    assert [c.rsplit(" ", 1)[1] for c in calls] == ["parts/first", "parts/second"]


def test_a_missing_queue_file_is_a_one_line_error(tree: Path):
    done = run_queue(tree, str(tree / "nope.queue"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no queue file" in done.stderr and "nope.queue" in done.stderr
    assert not (tree / "calls.txt").exists()


def test_it_waits_for_the_process_it_is_given(tree: Path):
    """A WAIT_PID that has already exited starts the queue at once; a live one holds it."""
    queue = tree / "q3.queue"
    queue.write_text("study_x full lora parts/w\n")
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert run_queue(tree, str(queue), str(gone.pid)).returncode == 0
    assert (tree / "calls.txt").read_text().count("\n") == 1

    (tree / "calls.txt").unlink()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        runner = subprocess.Popen(["bash", str(tree / "scripts" / "bench-queue.sh"), str(queue), str(holder.pid)],
                                  cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        with pytest.raises(subprocess.TimeoutExpired):
            runner.wait(timeout=2)
        assert not (tree / "calls.txt").exists()
    finally:
        holder.kill()
        holder.wait()
        os.killpg(runner.pid, signal.SIGKILL)  # the script and the sleep it polls with
        runner.wait()
