"""SLURM as users run it: scripts/train.sbatch submitted to a real one-node cluster (scripts/slurm_cluster.sh), and
the checks that refuse a SLURM job whose tasks are not the trainer's processes.

Two tasks on the CPU (gloo). The jobs are few and tiny (12 steps); one uninterrupted job per trainer is the
reference of every comparison. No outcome depends on timing: a job that is to be pre-empted waits at a given
step (``WaitAt``) until its signal has arrived, and every wait on SLURM has a deadline, after which the test
fails and its jobs are cancelled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest

from llm.errors import UserError
from llm.runtime import launch
from llm.runtime.topology import Topology, check_slurm_tasks
from tests.conftest import ROOT
from tests.test_distributed import BASE, final_weights, run
from tests.test_resume import assert_same_weights, losses

CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
SBATCH = ROOT / "scripts" / "train.sbatch"
# 12 steps of the tiny model in float32, validated every 6; signals are agreed at logging steps (every 3)
STEPS = [*BASE, "data.batch_size=4", "trainer.max_steps=12", "trainer.val_check_interval=6"]
STEPS += ["trainer.log_every_n_steps=3"]
TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=6G"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
DEADLINE_S = 600.0  # any one wait on a job; a job of this file takes well under a minute of training


class WaitAt(L.Callback):
    """Test helper: after optimizer step ``at[restart]`` (``restart``: SLURM_RESTART_COUNT, 0 outside SLURM) each
    rank writes ``waiting-<restart>-<step>.rank<r>`` (its pid) in the run directory and waits, at most 300 s, until
    it got a signal itself (then it writes ``signalled-...``) or a file ``go-<restart>-<step>`` appears. The
    training is untouched: only the moment at which it goes on depends on the test."""

    def __init__(self, at: list[int]) -> None:
        self.at = list(at)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restart >= len(self.at) or trainer.global_step != self.at[restart]:
            return
        from callbacks.resilience import LastCheckpoint

        last = next(cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint))
        run_dir = Path(trainer.default_root_dir)
        tag = f"{restart}-{trainer.global_step}"
        (run_dir / f"waiting-{tag}.rank{trainer.global_rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and last.requested is None and not (run_dir / f"go-{tag}").exists():
            time.sleep(0.05)  # a signal interrupts the sleep; its handler runs before the next check
        if last.requested is not None:
            (run_dir / f"signalled-{tag}.rank{trainer.global_rank}").write_text(last.requested)


def gate(*steps: int) -> list[str]:
    return ["+callbacks.gate._target_=tests.test_slurm.WaitAt", f"+callbacks.gate.at=[{','.join(map(str, steps))}]"]


def wait_for_files(pattern: str, where: Path, count: int, what: str, job=None) -> list[Path]:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        found = sorted(where.glob(pattern))
        if len(found) >= count:
            return found
        if job is not None and job.state() in ENDED:
            break
        time.sleep(0.2)
    raise AssertionError(f"no {count} x {pattern} in {where} ({what}); log:\n{job.log()[-3000:] if job else ''}")


class Cluster:
    def __init__(self, env: dict[str, str], outputs: Path) -> None:
        self.env = env
        self.outputs = outputs
        self.jobs: list[Job] = []

    def cmd(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(args, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def submit(self, *overrides: str, sbatch: tuple[str, ...] = (), cache: Path) -> Job:
        out = self.cmd(
            "sbatch", "--parsable", *TASKS, f"--output={self.outputs}/slurm-%j.out", *sbatch, str(SBATCH),
            *STEPS, f"data.cache_dir={cache}", *overrides,
        )  # fmt: skip
        job = Job(self, out.split(";")[0])
        self.jobs.append(job)
        return job


class Job:
    def __init__(self, cluster: Cluster, job_id: str) -> None:
        self.cluster = cluster
        self.id = job_id
        self.run_dir = cluster.outputs / f"slurm-{job_id}"

    def show(self) -> dict[str, str]:
        line = self.cluster.cmd("scontrol", "show", "job", "-o", self.id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def state(self) -> str:
        return self.show().get("JobState", "UNKNOWN")

    def log(self) -> str:
        path = self.cluster.outputs / f"slurm-{self.id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, states=ENDED, timeout: float = DEADLINE_S) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.show()
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(
            f"job {self.id} not in {states} after {timeout:.0f} s: {self.show()}\n{self.log()[-3000:]}"
        )

    def status(self) -> dict:
        return json.loads((self.run_dir / "status.json").read_text())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The local cluster (the one running, or started by the repository's script), and the jobs of this module,
    cancelled at its end whatever happened."""
    running = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, timeout=60).returncode == 0
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        if "not installed" in message or "could not install" in message:
            pytest.skip(message)  # only where SLURM cannot be had; any other failure of the script fails the tests
        raise AssertionError(message)
    conf = subprocess.run(["bash", str(CLUSTER), "conf"], capture_output=True, text=True, check=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    outputs = tmp_path_factory.mktemp("slurm-outputs")
    env.update(SLURM_CONF=conf, LLM_OUTPUTS=str(outputs))
    c = Cluster(env, outputs)
    yield c
    for job in c.jobs:
        if job.state() not in ENDED:
            c.cmd("scancel", job.id, check=False)
    if not running:  # started here: stopped here (.ci/run starts it before the tests and stops it after)
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def reference(cluster, data_cache):
    """The uninterrupted jobs: sbatch scripts/train.sbatch with trainer=ddp and trainer=fsdp (both at once: 2
    tasks each on the node's CPUs, queued one after the other when they do not fit)."""
    jobs = {t: cluster.submit(f"trainer={t}", "trainer.devices=2", cache=data_cache) for t in ("ddp", "fsdp")}
    for job in jobs.values():
        assert job.wait()["JobState"] == "COMPLETED", job.log()[-3000:]
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_sbatch_script_equals_the_run_by_hand(reference, tmp_path, data_cache, trainer):
    job = reference[trainer]
    assert job.status()["status"] == "ok"
    # one run directory, named after the job id (the script's, from $LLM_OUTPUTS), nothing else beside it
    assert sorted(p.name for p in job.cluster.outputs.glob(f"slurm-{job.id}*")) == [
        f"slurm-{job.id}",
        f"slurm-{job.id}.out",
    ]
    assert "Starting with 2 processes" in job.log()
    by_hand = tmp_path / "by-hand"
    run(by_hand, data_cache, *STEPS[len(BASE) :], f"trainer={trainer}", "trainer.devices=2")
    ref, got = losses(by_hand, "val/loss"), losses(job.run_dir, "val/loss")
    assert sorted(ref) == sorted(got) and len(ref) >= 3  # step 0, two validations in training, the final one
    assert got == ref  # the same processes, data and reductions: the same numbers
    assert job.status()["val_loss"] == json.loads((by_hand / "status.json").read_text())["val_loss"]


@pytest.mark.slow
def test_preempted_twice_then_requeued_ends_with_the_same_weights(cluster, reference, data_cache):
    # first pre-emption: SLURM's own timer, SIGUSR1 200 s before the 5-minute limit (SLURM may send it up to 60 s
    # early: 40 to 100 s after the start); the job waits for it after step 4, the ranks agree at step 6, save and
    # exit, and the script requeues the job
    job = cluster.submit("trainer=ddp", "trainer.devices=2", *gate(4, 7), sbatch=("--time=5", "--signal=USR1@200"),
                         cache=data_cache)  # fmt: skip
    wait_for_files("signalled-0-4.rank*", job.run_dir, 2, "the timer's SIGUSR1", job)
    # second pre-emption, in the requeued job: scancel --signal=USR1 while it waits after step 7 (agreed at 9)
    wait_for_files("waiting-1-7.rank*", job.run_dir, 2, "the requeued job at step 7", job)
    cluster.cmd("scancel", "--signal=USR1", job.id)
    wait_for_files("signalled-1-7.rank*", job.run_dir, 2, "scancel's SIGUSR1", job)
    info = job.wait()
    log = job.log()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert int(info["Restarts"]) >= 2  # 2; one more only if the third run outlived its own timer
    assert "SIGUSR1: saved" in log and "at step 6" in log and "at step 9" in log, log[-3000:]
    assert log.count("pre-empted (SIGUSR1), checkpoint saved; requeueing") == int(info["Restarts"])
    assert job.status()["status"] == "ok"
    assert_same_weights(final_weights(reference["ddp"].run_dir), final_weights(job.run_dir))
    # the same validation losses (each stop adds one validation of its own, at the stopping step, as Lightning does)
    ref, got = losses(reference["ddp"].run_dir, "val/loss"), losses(job.run_dir, "val/loss")
    assert {step: got[step] for step in ref} == ref


@pytest.mark.slow
def test_scancel_stops_cleanly_without_requeue(cluster, data_cache):
    job = cluster.submit("trainer=ddp", "trainer.devices=2", *gate(4), cache=data_cache)
    wait_for_files("waiting-0-4.rank*", job.run_dir, 2, "the job at step 4", job)
    cluster.cmd("scancel", job.id)  # SIGTERM to every task (and the batch script), SIGKILL after KillWait (30 s)
    info = job.wait()
    assert info["JobState"] == "CANCELLED" and int(info["Restarts"]) == 0
    status = job.status()
    assert status["status"] == "stopped" and status["signal"] == "SIGTERM", status
    assert "SIGTERM: saved" in job.log() and "at step 6" in job.log()
    assert (job.run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_a_task_that_dies_fails_the_job_at_once(cluster, data_cache):
    job = cluster.submit("trainer=ddp", "trainer.devices=2", *gate(4), cache=data_cache)
    waiting = wait_for_files("waiting-0-4.rank*", job.run_dir, 2, "the job at step 4", job)
    os.kill(int(waiting[1].read_text()), 9)  # rank 1 dies; rank 0 still waits at the step
    (job.run_dir / "go-0-4").write_text("")
    info = job.wait(timeout=120)  # --kill-on-bad-exit: the other task is ended at once, not at a collective timeout
    assert info["JobState"] == "FAILED", info
    assert re.search(r"srun: error: \S+: task 1: Killed", job.log()), job.log()[-3000:]


@pytest.mark.slow
def test_wrong_ntasks_per_node_is_refused_before_training(cluster, data_cache):
    job = cluster.submit("trainer=ddp", "trainer.devices=4", cache=data_cache)
    info = job.wait()
    log = job.log()
    # FAILED (exit 2 from the first task; srun's --kill-on-bad-exit may end the other, which then reads 143)
    assert info["JobState"] == "FAILED", info
    line = "error: SLURM starts 2 tasks per node (--ntasks-per-node=2) but trainer.devices=4"
    assert line in log and "Traceback" not in log and "Initializing distributed" not in log, log[-3000:]


# what srun gives each task (SLURM 22.05), and what the batch script itself sees (no step)
TASK_ENV = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_STEP_ID": "0"}


@pytest.mark.parametrize(
    ("env", "topology", "message"),
    [
        (TASK_ENV, Topology(devices=4), r"^SLURM starts 2 tasks per node \(--ntasks-per-node=2\) but trainer.devices=4"),
        (TASK_ENV, Topology(devices=2, num_nodes=2), r"SLURM runs this job on 1 nodes \(--nodes=1\) but trainer.num_nodes=2"),
        ({**TASK_ENV, "SLURM_STEP_ID": None}, Topology(devices=2), r"2 tasks but train.py runs in the batch script"),
    ],
)  # fmt: skip
def test_slurm_tasks_that_are_not_the_trainers_processes_are_refused(env, topology, message):
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(UserError, match=message):
        check_slurm_tasks(topology, env)


def test_slurm_tasks_that_match_or_opt_out_pass():
    check_slurm_tasks(Topology(devices=2), TASK_ENV)
    check_slurm_tasks(Topology(devices=1), {})  # not under SLURM
    check_slurm_tasks(Topology(devices=4), {**TASK_ENV, "SLURM_JOB_NAME": "interactive"})  # Lightning's opt-out
    check_slurm_tasks(Topology(devices=1), {"SLURM_NTASKS": "1"})  # `python train.py` in a one-task batch script


def test_an_early_sigusr1_is_noted_not_fatal():
    before = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        launch.note_early_signals()
        os.kill(os.getpid(), signal.SIGUSR1)  # the default action would end pytest here
        assert launch.take_noted_signal() == "SIGUSR1"
        assert launch.take_noted_signal() is None  # taken once: a sweep's next job starts clean
    finally:
        signal.signal(signal.SIGUSR1, before)
