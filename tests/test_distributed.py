"""Data-parallel training over MPI (gptcore.distributed), through a real `mpiexec` on localhost.

The equivalence tests run tests/mpi_train_steps.py (K steps of gptcore.train.train_step on a fixed
sequence of batches) alone and under `mpiexec -n 2`; the others run `mpiexec -n 2 python -m gptcore
train` end to end on a tiny model. They skip only where mpi4py or mpiexec is missing (`make test`
installs both: pyproject's test extra holds mpi4py and the mpich wheel).
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_cli import ENV, TINY, assert_clean_error, metrics, ok, python_like_text, trainer_state
from gptcore import distributed
from gptcore.checkpoint import load_model

MPIEXEC = distributed.find_mpiexec()     # None without mpiexec or mpi4py
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec and mpi4py "
                               "(pip install 'gptcore[mpi]')")

TESTS = pathlib.Path(__file__).parent
RANKS = 2
# test_cli's tiny model without its --threads 1: the ranks choose their threads themselves
NO_THREADS = TINY[:TINY.index("--threads")] + TINY[TINY.index("--threads") + 2:]


def mpirun(n, *command, cwd, env=None, timeout=120):
    """`mpiexec -n n command...` in cwd -> CompletedProcess with text stdout and stderr."""
    return subprocess.run([MPIEXEC, "-n", str(n), *map(str, command)], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def gptcore_train(*args):
    return [sys.executable, "-m", "gptcore", "train", *map(str, args)]


# ----------------------------------------------------------------------------------------------------
# 1. Without a launcher, nothing changes
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variable", distributed.LAUNCHER_SIZE_VARIABLES)
def test_launched_ranks_reads_each_launchers_size_variable(monkeypatch, variable):
    for name in distributed.LAUNCHER_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_ranks() == 1
    monkeypatch.setenv(variable, "3")
    assert distributed.launched_ranks() == 3


def test_training_without_a_launcher_never_imports_mpi4py(tmp_path):
    (tmp_path / "corpus.txt").write_text(python_like_text(3000))
    code = ("import sys; from gptcore.cli import main; status = main(sys.argv[1:]); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'; sys.exit(status)")
    env = {name: value for name, value in ENV.items() if name not in distributed.LAUNCHER_SIZE_VARIABLES}
    ok(subprocess.run([sys.executable, "-c", code, "train", "--data", "corpus.txt", "--out", "run", *TINY,
                       "--max-iters", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120))


# ----------------------------------------------------------------------------------------------------
# 2. Two ranks of batch B train the model one process of batch 2B trains
# ----------------------------------------------------------------------------------------------------

def train_steps(tmp_path, name, ranks):
    """tests/mpi_train_steps.py alone (ranks=None) or under mpiexec -n ranks -> [rank r's arrays]."""
    out = tmp_path / name
    out.mkdir()
    script = [sys.executable, TESTS / "mpi_train_steps.py", out]
    if ranks is None:
        ok(subprocess.run(script, env=ENV, capture_output=True, text=True, timeout=120))
    else:
        ok(mpirun(ranks, *script, cwd=tmp_path))
    return [dict(np.load(out / f"rank{rank}.npz")) for rank in range(ranks or 1)]


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("equivalence")
    return (train_steps(tmp_path, "alone", None)[0], train_steps(tmp_path, "ranks", RANKS),
            train_steps(tmp_path, "ranks-again", RANKS))


def relative_error(got, want):
    return np.abs(got.astype(np.float64) - want).max() / np.abs(want.astype(np.float64)).max()


# The two runs add the same per-row terms in a different order: a lone process sums the gradient of
# all 2B x T rows inside each kernel; a rank sums its B x T rows, and MPI adds the two partial sums.
# Each such sum differs by a few float32 roundings (2^-24 relative each), and over the steps the
# differences pass through AdamW into the weights; we measure about 2e-6 of the largest entry after
# all the steps. 2e-5 leaves room for other sizes of OpenMP/MPI partial sums while staying far below
# what a wrong average does (rows left out, a gradient not divided by N, clipping by one rank's norm:
# 1e-2 and more, or a loss off by a factor).
FLOAT32_REORDERED = 2e-5


@needs_mpi
@pytest.mark.parametrize("what", ["params", "grads", "losses"])
def test_two_ranks_with_batch_b_match_one_process_with_batch_2b(equivalence_runs, what):
    alone, ranks, _ = equivalence_runs
    assert relative_error(ranks[0][what], alone[what]) < FLOAT32_REORDERED


@needs_mpi
def test_every_rank_ends_with_bitwise_the_same_parameters(equivalence_runs):
    _, ranks, _ = equivalence_runs
    for what in ("params", "grads", "losses"):
        assert ranks[0][what].tobytes() == ranks[1][what].tobytes(), what


@needs_mpi
def test_two_ranks_run_twice_give_bitwise_the_same_result(equivalence_runs):
    _, ranks, again = equivalence_runs
    for what in ("params", "grads", "losses"):
        assert ranks[0][what].tobytes() == again[0][what].tobytes(), what


# ----------------------------------------------------------------------------------------------------
# 3. `mpiexec -n 2 gptcore train` end to end, and resuming under mpiexec
# ----------------------------------------------------------------------------------------------------

STEPS, EVAL_EVERY = 20, 10
COMMON = ["--data", "corpus.txt", *NO_THREADS,
          "--eval-interval", EVAL_EVERY, "--log-interval", 5, "--warmup-iters", 2, "--lr-decay-iters", STEPS]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mpi")
    (folder / "corpus.txt").write_text(python_like_text(20_000))
    return folder


@pytest.fixture(scope="module")
def mpi_runs(workdir):
    """-> {name: CompletedProcess}: "whole" (STEPS steps under mpiexec -n 2), "half" (STEPS / 2 steps)
    and "resumed" (the half run resumed to STEPS, under mpiexec -n 2)."""
    if MPIEXEC is None:
        pytest.skip("needs mpiexec and mpi4py")
    runs = {"whole": ok(mpirun(RANKS, *gptcore_train(*COMMON, "--out", "whole", "--max-iters", STEPS),
                               cwd=workdir)),
            "half": ok(mpirun(RANKS, *gptcore_train(*COMMON, "--out", "resumed", "--max-iters", STEPS // 2),
                              cwd=workdir))}
    runs["resumed"] = ok(mpirun(RANKS, *gptcore_train("--out", "resumed", "--resume", "--max-iters", STEPS),
                                cwd=workdir))
    return runs


@needs_mpi
def test_mpiexec_train_saves_a_checkpoint_that_generate_loads(mpi_runs, workdir):
    assert trainer_state(workdir / "whole")["step"] == STEPS
    assert trainer_state(workdir / "whole")["ranks"] == RANKS
    result = ok(subprocess.run([sys.executable, "-m", "gptcore", "generate", "--model", "whole",
                                "--max-new-tokens", "20", "--seed", "1"], cwd=workdir, env=ENV,
                               capture_output=True, text=True, timeout=60))
    assert len(result.stdout) > 0


@needs_mpi
def test_mpiexec_train_header_gives_the_global_batch(mpi_runs):
    assert "global batch 2 ranks x 4 x 1 micro-batches = 8 sequences a step" in mpi_runs["whole"].stdout


@needs_mpi
def test_only_rank_0_prints_and_writes_metrics(mpi_runs, workdir):
    out = mpi_runs["whole"].stdout
    assert out.count("done: ") == 1 and out.count("step 0: train loss") == 1
    lines = [(r["step"], r["eval"]) for r in metrics(workdir / "whole")]
    assert lines == sorted(set(lines)), "a line written twice"
    assert [step for step, evaluated in lines if evaluated] == [0, EVAL_EVERY, STEPS]


@needs_mpi
def test_resume_under_mpiexec_ends_bitwise_where_the_uninterrupted_run_does(mpi_runs, workdir):
    assert f"resuming at step {STEPS // 2}" in mpi_runs["resumed"].stdout
    (whole, _), (resumed, _) = (load_model(workdir / name) for name in ("whole", "resumed"))
    assert whole.flat_params.tobytes() == resumed.flat_params.tobytes()
    for key in ("step", "sampler", "ranks"):
        assert trainer_state(workdir / "whole")[key] == trainer_state(workdir / "resumed")[key]
    evaluations = [[(r["step"], r["val_loss"]) for r in metrics(workdir / name) if r["eval"]]
                   for name in ("whole", "resumed")]
    assert evaluations[0] == evaluations[1]


@needs_mpi
def test_resuming_a_two_rank_run_in_one_process_is_refused(mpi_runs, workdir):
    result = subprocess.run([sys.executable, "-m", "gptcore", "train", "--out", "whole", "--resume",
                             "--max-iters", str(STEPS + 5)], cwd=workdir, env=ENV, capture_output=True, text=True,
                            timeout=60)
    assert "trained on 2 ranks and this is 1" in assert_clean_error(result, "train")


@needs_mpi
def test_a_bad_flag_under_mpiexec_gives_one_line_and_exit_2(workdir):
    result = mpirun(RANKS, *gptcore_train("--data", "missing.txt", "--out", "bad", *TINY), cwd=workdir)
    assert "missing.txt" in assert_clean_error(result, "train")


@needs_mpi
def test_a_flag_argparse_rejects_under_mpiexec_gives_one_line(workdir):
    result = mpirun(RANKS, *gptcore_train("--max-iters", "many"), cwd=workdir)
    assert "--max-iters" in assert_clean_error(result, "train")


@needs_mpi
def test_each_rank_defaults_to_its_share_of_the_cores(workdir):
    env = {name: value for name, value in ENV.items() if name != "OMP_NUM_THREADS"}
    result = ok(mpirun(RANKS, *gptcore_train("--data", "corpus.txt", "--out", "threads", *NO_THREADS,
                                             "--max-iters", 1), cwd=workdir, env=env))
    threads = max(1, distributed.cores_available() // RANKS)
    assert f"; {threads} threads per rank" in result.stdout


# ----------------------------------------------------------------------------------------------------
# 4. Failure and Ctrl-C
# ----------------------------------------------------------------------------------------------------

@needs_mpi
def test_a_rank_that_fails_stops_the_whole_job_within_seconds_with_its_error_line(workdir):
    env = {**ENV, distributed.TEST_FAIL_RANK: "1"}
    started = time.perf_counter()
    result = mpirun(RANKS, *gptcore_train(*COMMON, "--out", "failing", "--max-iters", 1000), cwd=workdir,
                    env=env, timeout=60)
    seconds = time.perf_counter() - started
    assert result.returncode != 0
    assert "gptcore train: error: rank 1 of 2: injected failure on rank 1" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert seconds < 20, f"the job took {seconds:.1f} s to stop"


@needs_mpi
def test_ctrl_c_on_mpiexec_stops_every_rank_and_rank_0_saves(workdir):
    process = subprocess.Popen([MPIEXEC, "-n", str(RANKS), *gptcore_train(*COMMON, "--out", "interrupted",
                                                                          "--max-iters", 1_000_000,
                                                                          "--lr-decay-iters", 1_000_000)],
                               cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (workdir / "interrupted" / "metrics.jsonl").exists() or \
            len(metrics(workdir / "interrupted")) < 3:
        assert time.time() < deadline and process.poll() is None, "training never started"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, stderr
    step = trainer_state(workdir / "interrupted")["step"]
    assert step > 0 and f"interrupted by SIGINT at step {step}" in stdout
    assert stdout.count("interrupted by SIGINT") == 1


def rank_pid(rank, out):
    """The pid of the `gptcore train --out out` process that runs as `rank` (from /proc, Linux)."""
    for proc in pathlib.Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in command and f"PMI_RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@needs_mpi
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's pid in /proc")
def test_a_rank_killed_outright_stops_the_whole_job_within_seconds(workdir):
    out = workdir / "killed"
    process = subprocess.Popen([MPIEXEC, "-n", str(RANKS), *gptcore_train(*COMMON, "--out", out,
                                                                          "--max-iters", 1_000_000)],
                               cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "metrics.jsonl").exists() or (pid := rank_pid(1, out)) is None:
        assert time.time() < deadline and process.poll() is None, "training never started"
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    started = time.perf_counter()
    process.communicate(timeout=60)
    assert process.returncode != 0
    assert time.perf_counter() - started < 20
    assert rank_pid(0, out) is None, "rank 0 outlived the job"
