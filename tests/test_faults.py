"""Fault injection: a training run killed, signalled, diverging, locked out, on a full or read-only
disk, or fed damaged files, always leaves a checkpoint that resumes, and says what happened in one line.

WHAT'S GOING ON HERE
  WHAT   1. kill -9 at random moments of a run that saves every step, then `train --resume`: it must
            succeed every time and end with the uninterrupted run's weights, optimizer moments and
            step, bit for bit (KILL_TRIALS trials, 20 by default; GPTCORE_KILL_TRIALS=40 for the
            issue's bar); SIGTERM (exit 143) and two Ctrl-C 0-50 ms apart (exit 130) the same way;
         2. a second trainer in the same run folder is refused with the first one's pid, and the lock
            of a process killed with -9 does not block the next one;
         3. a run that diverges stops with one line naming the step and the last good checkpoint,
            which stays current and loads;
         4. damaged and hostile files (trainer_state.json fields, deep nesting, metrics.jsonl lines,
            NaN weights): one line, exit 2, no traceback, no file changed; a metrics.jsonl with bad
            lines resumes with a warning;
         5. filesystem faults: a full disk (a small tmpfs; root only), a read-only --out, --out under
            a file, an empty --out: one line each, nothing good removed, no temporary file left;
         6. --temperature so small that logits / T overflows samples greedily; --threads 3000000000
            is one line.
  HOW    Every run is tiny (1 layer, 8 channels, block 8, one eval batch): 40 steps with a save at
         every step take about a second, so a kill lands in the middle of a save often. The kill
         moments are drawn from a seeded random.Random, after the run's first checkpoint exists
         (RUN/latest), so each trial is reproducible in its schedule (not in the OS's timing).
         Subprocesses run with OMP_NUM_THREADS=1 and --threads 1, the condition for bitwise resume.
"""
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from gptcore import checkpoint
from gptcore.checkpoint import checkpoint_folder, load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--block-size", "8", "--batch-size", "2",
        "--eval-iters", "1", "--threads", "1", "--sample-tokens", "0", "--no-progress", "--no-report", "--lr", "3e-3",
        "--warmup-iters", "5"]
STEPS = 40
EVERY_STEP = ["--max-iters", STEPS, "--eval-interval", 1, "--log-interval", 1]
KILL_TRIALS = int(os.environ.get("GPTCORE_KILL_TRIALS", "20"))


def corpus_text():
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "\n"]
    return " ".join(rng.choice(words) for _ in range(1500))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "corpus.txt"
    path.write_text(corpus_text())
    return path


def gptcore(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "gptcore", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def start(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "gptcore", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def assert_one_line(result, command, exit_status=2):
    """Exit `exit_status`, no traceback, stderr exactly one `gptcore <command>: error: ...` line."""
    assert result.returncode == exit_status, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"gptcore {command}: error: "), result.stderr
    return result.stderr.strip()


def snapshot(folder):
    """Every file under `folder` (but RUN/.lock, which any trainer past its flags rewrites) -> bytes."""
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def leftovers(run):
    """Temporary files or folders a save could leave: there must be none."""
    return [str(p) for p in pathlib.Path(run).rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")
            or p.name.endswith(".tmp.png")]


def final_state(run):
    """(weights, optimizer moments, trainer step, optimizer step count) of a run's current checkpoint."""
    folder = pathlib.Path(checkpoint_folder(run))
    model, _ = load_model(run)
    moments = load_file(folder / checkpoint.OPTIMIZER)
    state = json.loads((folder / checkpoint.TRAINER_STATE).read_text())
    return ({name: p.tobytes() for name, p in model.params.items()},
            {name: m.tobytes() for name, m in moments.items()}, state["step"], state["optimizer_meta"])


@pytest.fixture(scope="module")
def uninterrupted(corpus):
    """The run every interrupted one must end equal to."""
    ok(gptcore("train", "--data", corpus, "--out", "whole", *TINY, *EVERY_STEP, cwd=corpus.parent))
    return final_state(corpus.parent / "whole")


def wait_for_first_checkpoint(process, run, timeout=60):
    deadline = time.monotonic() + timeout
    while not (run / checkpoint.LATEST).exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within the timeout"
        time.sleep(0.01)


def interrupt_and_resume(corpus, run, send, expected_exit):
    """Start the every-step run into `run`, let `send(process)` interrupt it once its first checkpoint
    exists, check the exit status, then resume to the end. -> (stdout of the interrupted run,
    whether it was still running when interrupted)."""
    process = start("train", "--data", corpus, "--out", run, *TINY, *EVERY_STEP, cwd=corpus.parent)
    try:
        wait_for_first_checkpoint(process, run)
        send(process)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    finished = process.returncode == 0           # the run can end before the signal arrives
    if not finished:
        assert process.returncode == expected_exit, f"exit {process.returncode}\n{stdout}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    resumed = ok(gptcore("train", "--resume", "--out", run, cwd=corpus.parent))
    assert f"done: {STEPS} steps" in resumed.stdout
    assert not leftovers(run), leftovers(run)
    return stdout, not finished


# ---- 1. kill -9, SIGTERM, double Ctrl-C --------------------------------------------------------------

def test_kill_9_at_random_moments_then_resume_ends_bitwise_equal_to_an_uninterrupted_run(
        corpus, uninterrupted, tmp_path):
    schedule = random.Random(9)
    killed = 0
    for trial in range(KILL_TRIALS):
        run = tmp_path / f"kill{trial}"
        delay = schedule.uniform(0.0, 1.2)           # about the length of the 40 steps after the first save

        def kill(process):
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)

        _, was_running = interrupt_and_resume(corpus, run, kill, -signal.SIGKILL)
        killed += was_running
        assert final_state(run) == uninterrupted, f"trial {trial} (kill after {delay:.3f} s)"
    # most trials must really have killed a running trainer, or the test proves little
    assert killed >= KILL_TRIALS * 3 // 4, f"only {killed} of {KILL_TRIALS} kills hit a running trainer"
    print(f"{KILL_TRIALS} kill -9 trials, {killed} killed a running trainer, all resumed bitwise equal")


@pytest.mark.parametrize("trial", range(3))
def test_sigterm_saves_exits_143_with_one_line_and_the_run_resumes_bitwise_equal(
        corpus, uninterrupted, tmp_path, trial):
    delay = random.Random(15 + trial).uniform(0.0, 0.8)

    def terminate(process):
        time.sleep(delay)
        process.send_signal(signal.SIGTERM)

    stdout, was_running = interrupt_and_resume(corpus, tmp_path / "run", terminate, 128 + signal.SIGTERM)
    if was_running:
        lines = [line for line in stdout.splitlines() if line.startswith("interrupted")]
        assert len(lines) == 1 and lines[0].startswith("interrupted by SIGTERM at step "), stdout
    assert final_state(tmp_path / "run") == uninterrupted


@pytest.mark.parametrize("gap", [0.0, 0.005, 0.05])
def test_two_ctrl_c_in_quick_succession_leave_a_checkpoint_that_resumes_bitwise_equal(
        corpus, uninterrupted, tmp_path, gap):
    """The second SIGINT may land in the save the first one asked for (then the save finishes) or
    after it; either way the current checkpoint is complete. Exit 130 in both cases."""
    delay = random.Random(int(gap * 1000)).uniform(0.0, 0.8)

    def twice(process):
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        time.sleep(gap)
        process.send_signal(signal.SIGINT)

    interrupt_and_resume(corpus, tmp_path / "run", twice, 130)
    assert final_state(tmp_path / "run") == uninterrupted


def test_a_signal_during_a_save_only_asks_again():
    """The handler itself: inside saving() a second signal does not raise; outside it, it does."""
    from gptcore.train import _StopFlag
    with _StopFlag() as stop:
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        assert stop.requested == signal.SIGTERM
        with stop.saving():
            handler(signal.SIGINT, None)               # no KeyboardInterrupt mid-save
        assert stop.requested == signal.SIGTERM        # the first signal is the one reported
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGTERM) is not handler      # restored


# ---- 2. two trainers, one folder ---------------------------------------------------------------------

def test_a_second_trainer_is_refused_with_the_pid_and_a_dead_ones_lock_does_not_block(corpus, tmp_path):
    run = tmp_path / "run"
    first = start("train", "--data", corpus, "--out", run, *TINY, "--max-iters", 10 ** 6, "--eval-interval", 50,
                  cwd=tmp_path)
    try:
        wait_for_first_checkpoint(first, run)
        for args in (["--resume"], ["--overwrite", "--data", corpus]):
            line = assert_one_line(gptcore("train", "--out", run, *args, cwd=tmp_path), "train")
            assert line == f"gptcore train: error: {run} is in use by another gptcore train (pid {first.pid})"
        assert first.poll() is None                    # the first trainer runs on, undisturbed
    finally:
        first.kill()                                   # kill -9: the lock file stays, the flock goes
        first.wait()
    assert (run / ".lock").exists()
    resumed = ok(gptcore("train", "--resume", "--out", run, "--max-iters", 1, cwd=tmp_path))
    assert "done: " in resumed.stdout                  # at the step the first trainer last saved


# ---- 3. divergence -----------------------------------------------------------------------------------

def test_a_run_that_diverges_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    result = gptcore("train", "--data", corpus, "--out", run, *TINY, "--max-iters", 200, "--eval-interval", 1,
                     "--lr", "1e4", "--warmup-iters", 0, "--grad-clip", 0, cwd=tmp_path)
    line = assert_one_line(result, "train")
    good = checkpoint_folder(run)
    step = json.loads((pathlib.Path(good) / checkpoint.TRAINER_STATE).read_text())["step"]
    assert f"the last good checkpoint is {good} (step {step})" in line, line
    assert "the evaluation at step" in line and "is not finite" in line, line      # caught at the evaluation
    model, _ = load_model(run)                         # loads: finite, checksums good
    assert all(np.isfinite(p).all() for p in model.params.values())


# ---- 4. damaged and hostile files --------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run(corpus):
    ok(gptcore("train", "--data", corpus, "--out", "short", *TINY, "--max-iters", 4, "--eval-interval", 2,
               cwd=corpus.parent))
    return corpus.parent / "short"


@pytest.fixture
def run_copy(short_run, tmp_path):
    return pathlib.Path(shutil.copytree(short_run, tmp_path / "run"))


def edit_signed(run, name, change):
    """Edit a file of the current checkpoint and rewrite manifest.json to match: what a hostile (or
    careless) hand does. Then the checks behind the checksums must hold on their own."""
    folder = pathlib.Path(checkpoint_folder(run))
    change(folder / name)
    files = {entry: (folder / entry).read_bytes() for entry in os.listdir(folder) if entry != checkpoint.MANIFEST}
    (folder / checkpoint.MANIFEST).write_bytes(checkpoint._manifest_bytes(files, None))


def edit_trainer_state(key, value, where=None):
    def change(path):
        state = json.loads(path.read_text())
        target = state if where is None else state[where]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
        path.write_text(json.dumps(state))
    return change


def replace_text(text):
    return lambda path: path.write_text(text)


HOSTILE_STATES = [
    ("step", -1, '"step" must be an integer in [0,'), ("step", 10 ** 30, '"step" must be an integer in [0,'),
    ("step", 2.5, '"step" must be an integer'), ("step", "3", '"step" must be an integer'),
    ("step", KeyError, '"step" must be an integer in [0, 9007199254740992], got nothing'),
    ("sampler", "PCG64", '"sampler"'), ("sampler", KeyError, '"sampler"'),
    ("sampler", {"bit_generator": "PCG64", "state": {"state": -5, "inc": "x"}}, '"sampler"'),
    ("best_val_loss", "low", '"best_val_loss"'), ("best_val_loss", -1.0, '"best_val_loss"'),
    ("config", [1], '"config" object'),
    ("max_iters", "many", '"config.max_iters" must be an int'), ("lr", "fast", '"config.lr" must be a finite'),
    ("lr", 1e400, '"config.lr" must be a finite'),
]


@pytest.mark.parametrize("key, value, words", HOSTILE_STATES,
                         ids=[f"{key}={str(value)[:20]}" for key, value, _ in HOSTILE_STATES])
def test_a_hostile_trainer_state_field_is_one_line_naming_file_and_field(run_copy, key, value, words):
    where = "config" if key in ("max_iters", "lr") else None
    edit_signed(run_copy, checkpoint.TRAINER_STATE, edit_trainer_state(key, value, where))
    before = snapshot(run_copy)
    line = assert_one_line(gptcore("train", "--resume", "--out", run_copy, cwd=run_copy.parent), "train")
    assert checkpoint.TRAINER_STATE in line and words in line, line
    assert snapshot(run_copy) == before


NESTED = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("name, command", [(checkpoint.CONFIG, "generate"), (checkpoint.TOKENIZER, "generate"),
                                           (checkpoint.TRAINER_STATE, "train"), (checkpoint.MANIFEST, "generate")])
def test_deeply_nested_json_is_one_line_not_a_recursion_error(run_copy, name, command):
    folder = pathlib.Path(checkpoint_folder(run_copy))
    if name == checkpoint.MANIFEST:
        (folder / name).write_text(NESTED)
    else:
        edit_signed(run_copy, name, replace_text(NESTED))
    before = snapshot(run_copy)
    args = (["generate", "--model", run_copy, "--max-new-tokens", 3] if command == "generate"
            else ["train", "--resume", "--out", run_copy])
    line = assert_one_line(gptcore(*args, cwd=run_copy.parent), command)
    assert name in line and "nested too deeply" in line, line
    assert snapshot(run_copy) == before


def test_nan_weights_are_one_line_naming_the_tensor_for_generate_eval_and_resume(run_copy, corpus):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    def poison(path):
        with safe_open(path, framework="np") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        tensors["wte.weight"][0, 0] = np.nan
        save_file(tensors, path, metadata=metadata)

    edit_signed(run_copy, checkpoint.MODEL, poison)
    before = snapshot(run_copy)
    for command, args in [("generate", ["--model", run_copy, "--max-new-tokens", 3]),
                          ("eval", ["--model", run_copy, "--data", corpus]),
                          ("train", ["--resume", "--out", run_copy])]:
        line = assert_one_line(gptcore(command, *args, cwd=run_copy.parent), command)
        assert "'wte.weight'" in line and "NaN or inf" in line, line
    assert snapshot(run_copy) == before


def test_metrics_jsonl_with_cut_short_non_utf8_and_stepless_lines_resumes_with_a_warning(run_copy):
    metrics = run_copy / "metrics.jsonl"
    good = metrics.read_bytes()
    metrics.write_bytes(good + b'{"step": 3, "train_lo' + b"\n\xff\xfe garbage\n" + b'{"no_step": 1}\n[1, 2]\n'
                        + b'{"step": 4, "eval": fal')                            # cut short: no newline
    result = ok(gptcore("train", "--resume", "--out", run_copy, "--max-iters", 6, cwd=run_copy.parent))
    assert "warning:" in result.stdout and "skipped 5 lines" in result.stdout, result.stdout
    lines = metrics.read_bytes().decode("utf-8").splitlines()
    records = [json.loads(line) for line in lines]                 # every line parses now
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and steps[-1] == 6


def test_an_empty_or_unknown_latest_pointer_is_one_line(run_copy):
    for text, words in [("", "is empty"), ("checkpoints/step-000999\n", "does not exist"),
                        ("/etc/passwd\n", "is damaged")]:
        (run_copy / checkpoint.LATEST).write_text(text)
        line = assert_one_line(gptcore("generate", "--model", run_copy, cwd=run_copy.parent), "generate")
        assert words in line, line


def test_an_older_flat_checkpoint_still_loads_and_resumes_into_the_run_layout(run_copy, corpus):
    """What today's releases write: the five files directly in the folder, no manifest, no latest."""
    flat = run_copy.parent / "flat"
    shutil.copytree(checkpoint_folder(run_copy), flat)
    (flat / checkpoint.MANIFEST).unlink()
    ok(gptcore("generate", "--model", flat, "--max-new-tokens", 3, "--seed", 1, cwd=run_copy.parent))
    ok(gptcore("eval", "--model", flat, "--data", corpus, cwd=run_copy.parent))
    result = ok(gptcore("train", "--resume", "--out", flat, "--max-iters", 6, cwd=run_copy.parent))
    assert "done: 6 steps" in result.stdout
    assert (flat / checkpoint.LATEST).read_text().startswith("checkpoints/step-000006\n")


# ---- 5. filesystem faults ----------------------------------------------------------------------------

def _can_mount():
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = pathlib.Path(f"/tmp/gptcore-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                                 capture_output=True).returncode == 0
        if mounted:
            subprocess.run(["umount", str(probe)], check=True)
        return mounted
    finally:
        probe.rmdir()


needs_tmpfs = pytest.mark.skipif(not _can_mount(), reason="needs root and `mount -t tmpfs` (a small disk "
                                 "to fill, a file system to make read-only)")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at tmp_path/disk, unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk):
    """Fill the disk to the last byte: one file written until ENOSPC, in smaller and smaller pieces."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


@needs_tmpfs
def test_a_full_disk_stops_with_one_line_and_leaves_the_last_checkpoint_current(corpus, small_disk):
    run = small_disk / "run"
    ok(gptcore("train", "--data", corpus, "--out", run, *TINY, "--max-iters", 4, "--eval-interval", 2,
               cwd=corpus.parent))
    before = {k: v for k, v in snapshot(run).items() if k != "metrics.jsonl"}
    (small_disk / "reserve").write_bytes(b"\0" * 8192)     # two pages: room for metrics.jsonl, not a save
    fill(small_disk)
    (small_disk / "reserve").unlink()
    result = gptcore("train", "--resume", "--out", run, "--max-iters", 12, "--eval-interval", 1,
                     "--log-interval", 1000, cwd=corpus.parent)
    line = assert_one_line(result, "train")
    assert "no space left on device" in line.lower() and "the last good checkpoint is" in line, line
    assert not leftovers(run), leftovers(run)
    after = snapshot(run)
    for name, data in before.items():           # nothing good removed or changed
        if name != "loss.png":
            assert after.get(name) == data, name
    assert json.loads((pathlib.Path(checkpoint_folder(run)) / checkpoint.TRAINER_STATE).read_text())["step"] == 4
    (small_disk / "filler").unlink()             # room again: the run resumes
    assert "done: 12 steps" in ok(gptcore("train", "--resume", "--out", run, "--max-iters", 12,
                                           cwd=corpus.parent)).stdout


@needs_tmpfs
def test_a_read_only_out_is_one_line_and_changes_nothing(corpus, small_disk):
    run = small_disk / "run"
    ok(gptcore("train", "--data", corpus, "--out", run, *TINY, "--max-iters", 2, cwd=corpus.parent))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = snapshot(run)
    line = assert_one_line(gptcore("train", "--resume", "--out", run, "--max-iters", 4, cwd=corpus.parent),
                           "train")
    assert "read-only file system" in line.lower() and str(run) in line, line
    line = assert_one_line(gptcore("train", "--data", corpus, "--out", small_disk / "new", *TINY,
                                   cwd=corpus.parent), "train")
    assert "read-only file system" in line.lower(), line
    assert snapshot(run) == before
    ok(gptcore("generate", "--model", run, "--max-new-tokens", 3, cwd=corpus.parent))   # reading works


def test_out_under_a_file_or_empty_is_one_line(corpus, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me\n")
    line = assert_one_line(gptcore("train", "--data", corpus, "--out", "notes.txt/sub", *TINY, cwd=tmp_path),
                           "train")
    assert "notes.txt/sub" in line and "not a directory" in line.lower(), line
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"
    line = assert_one_line(gptcore("train", "--data", corpus, "--out", "", *TINY, cwd=tmp_path), "train")
    assert "--out" in line and "empty" in line, line


# ---- 6. sampling and thread flags --------------------------------------------------------------------

def test_a_temperature_that_underflows_samples_greedily(short_run):
    greedy = ok(gptcore("generate", "--model", short_run, "--prompt", "to", "--max-new-tokens", 20,
                        "--temperature", 0, cwd=short_run.parent)).stdout
    for temperature in ("1e-320", "5e-324", "1e-300"):
        tiny = ok(gptcore("generate", "--model", short_run, "--prompt", "to", "--max-new-tokens", 20,
                          "--temperature", temperature, "--seed", 3, cwd=short_run.parent)).stdout
        assert tiny == greedy, temperature


@pytest.mark.parametrize("command", ["train", "generate", "eval"])
def test_an_absurd_thread_count_is_one_line(short_run, corpus, command):
    args = {"train": ["--data", corpus, "--out", "elsewhere"], "generate": ["--model", short_run],
            "eval": ["--model", short_run, "--data", corpus]}[command]
    line = assert_one_line(gptcore(command, *args, "--threads", 3_000_000_000, cwd=short_run.parent), command)
    assert "--threads" in line and "[1, 1024]" in line, line
