"""gptcore.distributed: data-parallel training over MPI, the few collective operations train.py needs.

WHAT'S GOING ON HERE
====================

WHAT
  `mpiexec -n N gptcore train ...` starts N copies of gptcore ("ranks"). Data parallelism keeps one
  full copy of the model on every rank and splits the batch: each rank draws its own micro-batches,
  runs forward and backward on them, and then one all-reduce replaces every rank's gradient by the
  mean over the ranks:

      g = (g_0 + g_1 + ... + g_{N-1}) / N          each g_r the gradient of rank r's mean loss

  Every g_r is the mean over the same number of rows (--batch-size x --grad-accum), so g is exactly
  the gradient of the mean loss over all N x batch x grad_accum rows: N ranks with batch B train the
  model one process would train with batch N x B. Every rank then clips g (by its norm, the same on
  every rank) and applies the same AdamW step to the same parameters, so the copies never drift
  apart, and no parameters ever travel: only gradients do, once per step.

WHERE
  gptcore.train calls this module at a few points, through a Group:
    connect()               once: the group this process belongs to (SingleProcess without a launcher)
    sampler_seed(seed)      each rank's batch stream, derived from the run's seed and the rank
    average(flat_grads, l)  every step: the one Allreduce of model.flat_grads, and the mean loss
    stop_signal(signum)     every step: every rank stops at the same step if any rank got a signal
    gather / bcast          at each checkpoint: every rank's sampler state to rank 0, which writes
    all_or_none(setup)      setup fails on every rank or on none (one line, from the lowest failed rank)
    stop_everyone_on_failure  an exception on one rank during training aborts the whole job
  Rank 0 alone evaluates, prints, draws the progress bar, writes metrics.jsonl, loss.png and the
  checkpoints; the other ranks only train, and wait for rank 0 in the next collective.

HOW (staying out of the way)
  mpi4py is imported only when the process runs under an MPI launcher with more than one rank. We
  tell from the environment, before importing anything: MPICH's and Intel MPI's launchers set
  PMI_SIZE, Open MPI's OMPI_COMM_WORLD_SIZE, MVAPICH's MV2_COMM_WORLD_SIZE. Without them (or with
  a size of 1) connect() returns SingleProcess, whose operations do nothing, and `gptcore train`
  runs exactly as it does without MPI installed.

HOW (the all-reduce)
  One MPI_Allreduce(SUM) in place on the whole flat float32 gradient buffer (gptcore.model keeps
  every parameter's gradient in one contiguous array, so this is one call, not one per tensor), then
  a multiplication by 1/N. MPI computes the same sum on every rank, so the averaged gradient, and
  with it the parameters, are bitwise equal on every rank (tests/test_distributed.py checks it).
  The sum's order is MPI's, not a single process's: N ranks agree with one process of batch N x B
  to float32 rounding, not bit for bit. MPI moves 2 x (N - 1) / N x parameters x 4 bytes per rank
  per step with the ring (or reduce-scatter + all-gather) algorithm; LEARNING_PATH.md works out
  what that costs on a network (tools/scaling_table.py).

HOW (threads)
  Each rank runs the kernels on OMP_NUM_THREADS threads if it is set (OpenMP reads it itself), and
  otherwise on the cores this process may use divided by the ranks on its host (at least 1), so N
  ranks on one machine never run more threads than it has cores.

HOW (failure)
  A rank that raises while the others wait inside a collective would leave them waiting forever.
  stop_everyone_on_failure prints the failed rank's line ("rank 1 of 2: ...") on stderr and calls
  MPI_Abort, which makes the launcher kill every rank; the job exits non-zero within a second. A
  rank that dies outright (a kill -9) is noticed by the launcher, which kills the others. During
  setup, where every rank can still reach the same collective, all_or_none gathers every rank's
  outcome instead, so a bad flag or file gives one line and exit status 2 like a single process.
  Ctrl-C on mpiexec reaches every rank as SIGINT; the ranks agree each step (stop_signal) so that
  they stop after the same step and rank 0 saves a checkpoint.

  GPTCORE_TEST_FAIL_RANK=r (a test hook) makes rank r raise in its first all-reduce, so the tests can
  watch a rank fail while the others wait in that collective.
"""
import contextlib
import importlib.util
import os
import shutil
import sys
import time
import traceback

import numpy as np

from gptcore.errors import GptcoreError, ReportedElsewhere

# the environment variables MPI launchers set to the number of ranks they started
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCHER_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")     # and its rank
TEST_FAIL_RANK = "GPTCORE_TEST_FAIL_RANK"
# what a job stopped by a failed rank exits with: a user error (GptcoreError) as the CLI's usage exit,
# Ctrl-C as a shell reports SIGINT, anything else 1
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_BUG = 2, 130, 1
ABORT_GRACE_SECONDS = 0.5       # for the failed rank's line to reach the launcher before the abort


def launched_ranks():
    """The number of ranks an MPI launcher started this process among (1 without a launcher), read
    from the launcher's environment, without importing MPI."""
    for name in LAUNCHER_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def launched_rank():
    """This process's rank among the launched_ranks() (0 without a launcher), from the environment."""
    for name in LAUNCHER_RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def connect():
    """The group of ranks this process trains with: an MPIGroup under an MPI launcher with more than
    one rank (importing mpi4py), SingleProcess otherwise."""
    size = launched_ranks()
    if size == 1:
        return SingleProcess()
    try:
        from mpi4py import MPI
    except ImportError:
        raise GptcoreError(f"this process runs under an MPI launcher with {size} ranks, but mpi4py is not "
                           f"installed: pip install 'gptcore[mpi]'") from None
    return MPIGroup(MPI)


def find_mpiexec():
    """The mpiexec that launches gptcore's ranks here, or None when MPI cannot run: the one next to
    this Python first (the mpich wheel puts it in a virtual environment's bin/, which need not be on
    PATH), then PATH's; and None too without mpi4py, through which the ranks talk (looked up, not
    imported)."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    return shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                         os.environ.get("PATH", "")]))


def cores_available():
    """The cores this process may run on (its CPU affinity, where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class SingleProcess:
    """One process, no launcher: every collective is the identity."""

    rank, size, local_size = 0, 1, 1
    is_root = True

    def describe(self):
        return "1 process"

    def default_threads(self):
        return None                     # OpenMP's own default: OMP_NUM_THREADS, or every core

    def sampler_seed(self, seed):
        return seed

    def average(self, flat_grads, loss):
        return loss

    def stop_signal(self, signum):
        return signum

    def gather(self, value):
        return [value]

    def bcast(self, value):
        return value

    def all_or_none(self, build, undo):
        return build()

    @contextlib.contextmanager
    def stop_everyone_on_failure(self, command):
        yield


class MPIGroup:
    """The ranks of MPI_COMM_WORLD. Every method is a collective: every rank calls it, in the same
    order, or the ranks that did wait (which is what stop_everyone_on_failure is for)."""

    def __init__(self, MPI):
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # the ranks that share this host's memory, hence its cores
        self.local_size = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
        self.is_root = self.rank == 0
        self._fail_here = os.environ.get(TEST_FAIL_RANK) == str(self.rank)

    def describe(self):
        return f"{self.size} MPI ranks ({self.local_size} on this host)"

    def default_threads(self):
        """Threads per rank when --threads is not given: None if OMP_NUM_THREADS is set (OpenMP
        honours it), else this host's cores shared out among its ranks."""
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        return max(1, cores_available() // self.local_size)

    def sampler_seed(self, seed):
        """Rank r's batch stream: numpy's SeedSequence(seed, spawn_key=(r,)), a stream independent of
        every other rank's and of the evaluation generators (seeded by [seed, step])."""
        return np.random.SeedSequence(seed, spawn_key=(self.rank,))

    def average(self, flat_grads, loss):
        """flat_grads <- the mean of every rank's flat_grads, in place (float32, one Allreduce); returns
        the mean of every rank's loss."""
        if self._fail_here:
            raise GptcoreError(f"injected failure on rank {self.rank} ({TEST_FAIL_RANK}={self.rank})")
        self.comm.Allreduce(self.MPI.IN_PLACE, flat_grads, op=self.MPI.SUM)
        flat_grads *= np.float32(1.0 / self.size)
        return self.comm.allreduce(loss, op=self.MPI.SUM) / self.size

    def stop_signal(self, signum):
        """The signal any rank was asked to stop by (the largest number if several), or None, the same
        on every rank: they all stop after the same step."""
        agreed = self.comm.allreduce(signum or 0, op=self.MPI.MAX)
        return agreed or None

    def gather(self, value):
        """Every rank's value, in rank order, on rank 0; None on the others."""
        return self.comm.gather(value, root=0)

    def bcast(self, value):
        """Rank 0's value, on every rank."""
        return self.comm.bcast(value, root=0)

    def all_or_none(self, build, undo):
        """build() on every rank; if it raised GptcoreError on any rank, every rank raises (after
        undo(result) where it succeeded): the lowest failed rank its own error, naming the rank unless
        it is rank 0, the others ReportedElsewhere, so the job prints one line. Any other exception
        stops every rank (stop_everyone_on_failure)."""
        result, failure = None, None
        with self.stop_everyone_on_failure("gptcore train"):
            try:
                result = build()
            except GptcoreError as error:
                failure = str(error)
        failures = self.comm.allgather(failure)
        failed = [rank for rank, message in enumerate(failures) if message is not None]
        if not failed:
            return result
        if failure is None:
            undo(result)
        first = failed[0]
        if self.rank == first:
            raise GptcoreError(failure if first == 0 else f"rank {first} of {self.size}: {failure}")
        raise ReportedElsewhere(f"rank {first} of {self.size}: {failures[first]}")

    @contextlib.contextmanager
    def stop_everyone_on_failure(self, command):
        """Any exception inside the block: print this rank's line on stderr (a traceback too, for what
        is not a GptcoreError) and MPI_Abort the whole job, whose launcher then kills every rank."""
        try:
            yield
        except BaseException as error:
            if isinstance(error, GptcoreError):
                code, line = EXIT_ERROR, f"{command}: error: rank {self.rank} of {self.size}: {error}"
            elif isinstance(error, KeyboardInterrupt):
                code, line = EXIT_INTERRUPTED, f"{command}: interrupted on rank {self.rank} of {self.size}"
            else:
                traceback.print_exc()
                code, line = EXIT_BUG, f"{command}: rank {self.rank} of {self.size} failed: stopping every rank"
            print(line, file=sys.stderr, flush=True)
            sys.stdout.flush()
            # the launcher forwards our output through a pipe; MPI_Abort has it kill every process at
            # once, and a line still in that pipe is lost (seen with MPICH's hydra): give it a moment
            time.sleep(ABORT_GRACE_SECONDS)
            self.comm.Abort(code)
            os._exit(code)              # MPI_Abort may return before the launcher's kill arrives
