"""Long runs that survive: one writer per run directory (the lock), a restart on a directory without a complete
checkpoint starts fresh, a worker lost mid-run is restarted by torchrun from the last checkpoint with the same
losses, SIGTERM to the launcher saves and exits 0, SIGKILL of the launcher leaves no process behind, a dead peer
ends the job naming its rank, and --hang-timeout-minutes dumps every rank's stacks and exits.

The multi-process runs go through the real launcher (`qwen3-pretrain train --nproc-per-node 2`, gloo on CPU);
faults are injected into the workers by tests/faults/sitecustomize.py (on PYTHONPATH)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qwen3_pretrain.cli import main
from qwen3_pretrain.config import ConfigError, parse_train_args
from qwen3_pretrain.train import run_lock
from qwen3_pretrain.train.supervise import child_pids
from qwen3_pretrain.train.trainer import run_training
from qwen3_pretrain.train.watchdog import HANG_EXIT_CODE

from train_helpers import tiny_flags, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
FAULTS_DIR = Path(__file__).resolve().parent / "faults"
ITERS = 6
DEADLINE_S = 180.0


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny_text_document")


def _flags(data: str, **overrides: Any) -> list[str]:
    return tiny_flags(data, **{"train_iters": ITERS, "log_interval": 1, "eval_iters": 0, **overrides})


def _logged_losses(run_dir: Path) -> dict[int, float]:
    """Iteration -> loss from metrics.jsonl; a restarted run's later record of an iteration wins."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}


# ---- the run lock ----------------------------------------------------------------------------------------------


def test_a_held_directory_is_refused_naming_its_holder(tmp_path: Path) -> None:
    with run_lock.hold([tmp_path]):
        record = json.loads((tmp_path / run_lock.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] and record["started"]
        in_use = re.escape(f"{tmp_path} is in use by another run: pid {os.getpid()} on host {record['host']}")
        with pytest.raises(run_lock.RunDirectoryInUse, match=in_use):
            run_lock.check_free([tmp_path])
    run_lock.check_free([tmp_path])  # released at the end of the block
    with run_lock.hold([tmp_path]):
        pass


def test_the_lock_of_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from qwen3_pretrain.train import run_lock\n"
         "with run_lock.hold([Path(sys.argv[1])]):\n    print('held', flush=True); time.sleep(120)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(run_lock.RunDirectoryInUse, match=f"pid {holder.pid} on host"):
            run_lock.check_free([tmp_path])
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == holder.pid  # a stale lock file
    with run_lock.hold([tmp_path]):
        assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_file_system_without_locking_warns_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    with run_lock.hold([tmp_path]):
        assert f"warning: {tmp_path} is on a file system without flock" in capsys.readouterr().err


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    """Data-loader workers are forked from rank 0: the lock must end with rank 0, not with them."""
    ready, started = os.pipe()
    with run_lock.hold([tmp_path]):
        child = os.fork()
        if child == 0:  # the fork handlers have run by now
            os.write(started, b"1")
            time.sleep(30)
            os._exit(0)
        assert os.read(ready, 1) == b"1"
    try:
        run_lock.check_free([tmp_path])  # the child still runs, and holds no lock
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(started)


def test_a_second_run_on_a_directory_fails_before_writing(data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    save, run_dir = tmp_path / "ckpt", tmp_path / "metrics"
    launched: list[object] = []
    with run_lock.hold([save]):
        # in this process (as rank 0 under torchrun): before any process group or file
        assert main(["train", *_flags(data, save=save)]) == 1
        assert f"{save} is in use by another run: pid {os.getpid()}" in capsys.readouterr().err
        # the launcher refuses before starting torchrun
        monkeypatch.setattr(subprocess, "Popen", lambda *args, **_: launched.append(args))
        assert main(["train", "--nproc-per-node", "2", *_flags(data, save=save)]) == 2
        assert f"{save} is in use by another run" in capsys.readouterr().err and launched == []
    assert [p.name for p in save.iterdir()] == [run_lock.LOCK_FILE]
    with run_lock.hold([run_dir]):  # --run-dir is locked too when it is not --save
        assert main(["train", *_flags(data, save=save, run_dir=run_dir)]) == 1
        assert f"{run_dir} is in use by another run" in capsys.readouterr().err


# ---- restart that always works ---------------------------------------------------------------------------------


def test_load_equal_save_without_a_complete_checkpoint_starts_fresh(data: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    fresh = run_training(parse_train_args(_flags(data, train_iters=3, save=tmp_path / "fresh")))
    first = tmp_path / "first"  # a committed save, to copy parts of
    run_training(parse_train_args(_flags(data, train_iters=3, save=first, save_interval=2)))
    capsys.readouterr()
    killed = tmp_path / "killed"  # what a first save killed at various points leaves
    (killed / ".iter_0000002.5eed.incomplete").mkdir(parents=True)
    (killed / run_lock.LOCK_FILE).write_text('{"host": "gone", "pid": 1, "started": "then"}\n')
    (killed / "metrics.jsonl").write_text('{"iteration": 1, "lm_loss": 99.0}\n')
    (first / "iter_0000002").rename(killed / "iter_0000002")  # renamed into place, `latest` not yet written
    flags = _flags(data, train_iters=3, load=killed, save=killed)

    assert main(["train", *flags, "--exit-on-missing-checkpoint"]) == 2
    assert "holds no checkpoint yet and --exit-on-missing-checkpoint is set (it holds only " \
           ".iter_0000002.5eed.incomplete, iter_0000002, metrics.jsonl)" in capsys.readouterr().err
    assert main(["train", *flags]) == 0
    out = capsys.readouterr().out
    assert f"--load {killed} holds no checkpoint yet (it holds only .iter_0000002.5eed.incomplete, " \
           "iter_0000002, metrics.jsonl): starting from scratch" in out
    assert (killed / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert [_logged_losses(killed)[i] for i in (1, 2, 3)] == fresh.losses


def _env(fault: str | None = None, rank: int = 1, iteration: int = 3) -> dict[str, str]:
    """The workers' environment; `fault` ("exit" or "hang") strikes rank `rank` before iteration `iteration`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QWEN3_PRETRAIN_DEVICE": "cpu"}
    if fault is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS_DIR), env.get("PYTHONPATH")]))
        env.update(QWEN3_TEST_FAULT=fault, QWEN3_TEST_FAULT_RANK=str(rank), QWEN3_TEST_FAULT_ITERATION=str(iteration))
    return env


class Launcher:
    """`qwen3-pretrain train --nproc-per-node 2 FLAGS` in a subprocess, its output in a log file."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, flags: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qwen3_pretrain.cli", "train", "--nproc-per-node", "2", *flags],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self.proc

    def output(self) -> str:
        return self.log.read_text()

    def wait(self) -> tuple[int, str]:
        """The exit code and the output; fails the test when the run outlives the deadline."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=DEADLINE_S), self.output()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not end in {DEADLINE_S} s:\n{self.output()[-4000:]}") from None

    def wait_for_line(self, pattern: str) -> None:
        assert self.proc is not None
        end = time.monotonic() + DEADLINE_S
        while time.monotonic() < end and self.proc.poll() is None:
            if re.search(pattern, self.output()):
                return
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}:\n{self.output()[-4000:]}")


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """A Launcher; whatever still runs at the end of the test is killed (torchrun and its workers die with it)."""
    launch = Launcher(tmp_path / "launcher.log")
    yield launch
    if launch.proc is not None:
        launch.proc.kill()
        launch.proc.wait()


def test_a_worker_lost_mid_run_is_restarted_from_the_last_checkpoint(data: str, tmp_path: Path,
                                                                     launcher: Launcher) -> None:
    """Rank 1 dies before iteration 3 in the first attempt; torchrun (--max-restarts 1) restarts both workers,
    which resume from iteration 2 (--load = --save) and log the losses of a run without the fault."""
    reference = run_training(parse_train_args(_flags(data, save=tmp_path / "reference")))
    ckpt = tmp_path / "ckpt"
    flags = ["--max-restarts", "1", *_flags(data, save=ckpt, load=ckpt, save_interval=2)]
    launcher.start(flags, _env("exit", rank=1, iteration=3))
    code, output = launcher.wait()
    assert code == 0, output[-4000:]
    assert "fault injection: rank 1 exits before iteration 3" in output
    assert f"loading checkpoint from {ckpt} at iteration 2" in output
    losses = _logged_losses(ckpt)
    assert sorted(losses) == list(range(1, ITERS + 1))
    for iteration, expected in zip(reference.iterations, reference.losses, strict=True):
        assert abs(losses[iteration] - expected) <= 1e-5 * abs(expected), f"iteration {iteration}"


def test_a_dead_peer_ends_the_job_naming_its_rank(data: str, tmp_path: Path, launcher: Launcher) -> None:
    start = time.monotonic()
    launcher.start(_flags(data, distributed_timeout_minutes=10), _env("exit", rank=1, iteration=3))
    code, output = launcher.wait()
    assert code != 0 and time.monotonic() - start < 90, output[-4000:]  # far within the 10 minutes
    root_cause = output[output.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: 17", root_cause), output[-4000:]


@pytest.mark.parametrize("async_save", [False, True])  # async: saves every 2 iterations are in flight at the stop
def test_sigterm_to_the_launcher_saves_and_exits_0(data: str, tmp_path: Path, launcher: Launcher,
                                                   async_save: bool) -> None:
    ckpt = tmp_path / "ckpt"
    proc = launcher.start(_flags(data, train_iters=5000, save=ckpt, save_interval=2 if async_save else 1000,
                                 async_save=async_save), _env())
    launcher.wait_for_line(r"iteration +3/")
    proc.send_signal(signal.SIGTERM)
    code, output = launcher.wait()
    assert code == 0, output[-4000:]
    assert "Traceback" not in output and output.count("received SIGTERM") == 2
    stopped = int(re.findall(r"training stopped by signal at iteration (\d+)", output)[-1])
    assert 3 <= stopped < 1000
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)


def _descendants(pid: int) -> list[int]:
    children = child_pids(pid)
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def test_sigkill_of_the_launcher_leaves_no_process(data: str, tmp_path: Path, launcher: Launcher) -> None:
    ckpt = tmp_path / "ckpt"
    proc = launcher.start(_flags(data, train_iters=5000, save=ckpt, save_interval=5), _env())
    launcher.wait_for_line(r"successfully saved checkpoint from iteration +5 ")
    processes = _descendants(proc.pid)  # torchrun and its two workers
    assert len(processes) == 3, processes
    proc.kill()
    proc.wait()
    end = time.monotonic() + 10
    while time.monotonic() < end and any(map(_alive, processes)):
        time.sleep(0.2)
    assert not [pid for pid in processes if _alive(pid)], "processes outlived the launcher"
    saved = sorted(p.name for p in ckpt.iterdir())
    time.sleep(2)
    assert sorted(p.name for p in ckpt.iterdir()) == saved  # nothing writes there any more


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_hang_timeout_dumps_every_ranks_stacks_and_exits(data: str, tmp_path: Path, launcher: Launcher) -> None:
    """Rank 1 hangs before iteration 3; rank 0 waits for it in a collective: both dump their stacks and exit."""
    launcher.start(_flags(data, hang_timeout_minutes=0.1), _env("hang", rank=1, iteration=3))
    code, output = launcher.wait()
    assert code != 0, output[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}: no training iteration completed in 0.1 minutes (--hang-timeout-minutes 0.1)" in output
    assert "in faulty_train_step" in output and "in all_reduce" in output  # rank 1 hangs there, rank 0 waits there
    assert re.search(rf"exitcode\s*: {HANG_EXIT_CODE}", output), output[-4000:]


def test_hang_timeout_must_be_positive(data: str) -> None:
    with pytest.raises(ConfigError, match="--hang-timeout-minutes must be > 0"):
        parse_train_args(_flags(data, hang_timeout_minutes=0))
