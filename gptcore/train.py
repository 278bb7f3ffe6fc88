"""gptcore.train: the training loop behind `gptcore train`, and the evaluation behind `gptcore eval`.

WHAT'S GOING ON HERE
====================

WHAT
  train(TrainConfig(...)) does what nanoGPT's train.py does, as a function you can import and test.
  It reads as a short loop over four kinds of function:
    setup         read the corpus (a file, a folder, or by default this Python's own standard library
                  source), build the tokenizer (make_tokenizer: characters by default), encode, split
                  off the last 10% as
                  validation; build a GPT, AdamW (weight decay on the matrices only) and the batch
                  sampler, or load all three from --out to resume;
    train_step    one optimizer step: grad_accum micro-batches forward and backward (their gradients
                  add up to the gradient of the mean loss over all of them; with --dropout, each
                  forward drops with masks of its own, gptcore.dropout), clip the global gradient
                  norm, AdamW;
    estimate_loss every eval_interval steps, train and val loss on eval_iters random batches (never
                  with dropout), and a checkpoint (save);
    Report        what the user sees: the header, a progress bar on a terminal or plain lines in a
                  log file, metrics.jsonl, loss.png (drawn once, at the end), a sample (also kept in
                  samples.jsonl) and report.html (gptcore.visualize: rewritten after an evaluation
                  while drawing costs under REPORT_TIME_SHARE of the run's time, and with the
                  model's pictures at the end; --no-report turns it off). Speed is tokens/s and
                  MFU, model FLOPs per second over the machine's matmul peak (see Report.step).
  The step before each evaluation is recorded (train_step(run, record_dynamics=True)): its statistics
  (gptcore.dynamics) go into the evaluation's metrics.jsonl line under "dynamics". A resumed run's
  first line carries "resumed_from": the step it resumed at.
  The learning rate of each step follows warmup, then cosine decay (gptcore.optim.cosine_lr).

  evaluate(model, tokens) is the deterministic loss `gptcore eval` reports: the mean cross-entropy over
  every complete, non-overlapping window of the text, every target token counted once.

HOW (fine-tuning: --init-from)
  init_from_config(init_from, **given) is nanoGPT's init_from: the run starts from the weights of a
  Hugging Face GPT-2 folder (`huggingface-cli download gpt2 --local-dir gpt2`) or of a gptcore
  checkpoint, with that model's tokenizer and shape (n_layer, n_head, n_embd); block_size defaults
  to the model's context (n_positions) and may be smaller, which crops wpe to its first rows
  (gptcore.checkpoint.load_model). The optimizer starts fresh, at step 0. The run's checkpoints are
  gptcore's own, so --resume continues a fine-tuning run like any other.

  A new run refuses an --out folder that already holds a run (latest, or an older flat checkpoint's
  config.json, model.safetensors or trainer_state.json) unless it is told to resume it or to
  overwrite it (TrainConfig.overwrite). An overwriting run deletes the old run's checkpoints only
  after its own first one is saved.

HOW (resuming with the saved settings)
  A checkpoint's trainer_state.json keeps the run's TrainConfig. resume_config(out, **given) starts
  from those settings (the data, the schedule, the model's shape, the batch, the seed, ...) and
  replaces the ones in `given`; the CLI passes exactly the flags typed on its command line. A saved
  lr_decay_iters of None (decay until max_iters) becomes the saved max_iters, so a run extended with
  a larger --max-iters keeps its schedule (the learning rate stays at min_lr after the old end)
  unless --lr-decay-iters is given too. The model's shape cannot change on resume: a differing
  n_layer, n_head, n_embd or block_size is refused. The data can change (fine-tuning on other
  text), as long as the vocabulary covers it. The header says which saved settings changed.

HOW (resuming exactly)
  Everything random in a step comes from the batch sampler's generator, whose state is saved with the
  model and the optimizer's moments. Evaluation draws its batches from a generator seeded by
  (seed, step), never from the sampler's, so evaluating or not never changes which batches training
  sees. With the kernels bitwise deterministic, a run of 2N steps and a run of N steps resumed for N
  more end with the same weights, bit for bit (same thread count).

HOW (a run that is killed, diverges, or meets a full disk)
  Checkpoints go into the run folder through gptcore.checkpoint.save_run_checkpoint: each save is a
  new folder RUN/checkpoints/step-N, switched to by one atomic replace of RUN/latest, so a kill -9 at
  any moment leaves the previous checkpoint or the new one current, both complete, and --resume
  continues from it (tests/test_faults.py kills runs at random moments and checks that the resumed
  run ends bit for bit where the uninterrupted one does). --keep-checkpoints K keeps the newest K.

  Ctrl-C (SIGINT) and SIGTERM (what `kill` and job schedulers send) set a flag that the loop checks
  between steps; it then saves a checkpoint, prints one line and stops, and the CLI exits 128 + the
  signal's number: 130 for Ctrl-C, 143 for SIGTERM, as a shell reports a process the signal killed.
  A signal that arrives while a checkpoint is being written only asks again: the save finishes. A
  second signal at any other moment stops at once (KeyboardInterrupt, exit 130): the last checkpoint
  is intact, since nothing is ever written into it.

  Nothing non-finite is ever saved: a training loss, an evaluation or a parameter that is NaN or inf
  stops the run with one line naming the step and the last good checkpoint, which stays current.
  A checkpoint the disk refuses (full, read-only) stops the run the same way; the failed save leaves
  nothing behind.

  Only one trainer may write into a run folder: setup takes an exclusive fcntl.flock on RUN/.lock,
  held until the process ends. A second trainer is refused with the first one's pid; a lock left by
  a process that died is no lock at all (the kernel releases a flock with its process).

HOW (data parallel: `mpiexec -n N gptcore train`)
  gptcore.distributed gives train() a group of ranks (a SingleProcess without a launcher, whose
  calls do nothing). Each rank draws its own batches (its sampler seeded by the run's seed and its
  rank); train_step averages the gradient over the ranks with one all-reduce before clipping, so the
  norm clipped is the averaged gradient's. Rank 0 alone takes the lock, evaluates, reports and writes
  the checkpoints, which hold every rank's sampler state ("sampler": a list, "ranks": N); --resume
  refuses another N. Every step the ranks agree on whether a signal asked any of them to stop, and
  setup succeeds on every rank or fails on all with one line; an error during training aborts them all.
"""
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from gptcore import checkpoint, distributed, machine
from gptcore.data import BatchSampler, CorpusReport, eval_windows, read_corpus, split_tokens
from gptcore.dropout import Dropout
from gptcore.dynamics import StepDynamics
from gptcore.errors import GptcoreError
from gptcore.files import append_json_line, atomic_write, read_json_lines, remove_leftover_temp_files
from gptcore.kernels import MAX_THREADS, get_num_threads, set_num_threads
from gptcore.model import GPT, GPTConfig
from gptcore.optim import AdamW, cosine_lr
from gptcore.sample import generate
from gptcore.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
from gptcore.visualize import SAMPLES


@dataclass
class TrainConfig:
    """The settings of a training run, with nanoGPT's names and meanings. The defaults are nanoGPT's
    CPU "baby GPT" recipe for Shakespeare, characters (the README gives its measured time)."""
    data: str = None              # a text file or a folder; None = this Python's standard library source
    glob: str = "*.py"            # the files to read from a folder (recursively)
    out: str = "out"              # the run folder (latest, checkpoints/, metrics.jsonl, loss.png)
    resume: bool = False          # continue the run saved in `out` (see resume_config)
    overwrite: bool = False       # replace a run already saved in `out`
    tokenizer: str = "char"       # char, gpt2, bpe:N (N tokens trained on the training text) or a path
    init_from: str = None         # start from this model's weights and tokenizer: a Hugging Face GPT-2
                                  # folder or a gptcore checkpoint or run folder (see init_from_config)
    max_iters: int = 2000
    batch_size: int = 12
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    lr: float = 1e-3              # the peak learning rate
    min_lr: float = 1e-4          # where the cosine decay ends
    warmup_iters: int = 100
    lr_decay_iters: int = None    # None = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0        # 0 = no clipping
    dropout: float = 0.0          # each training forward drops activations with this probability (GPT-2: 0.1)
    grad_accum: int = 1           # micro-batches per step
    eval_interval: int = 250
    eval_iters: int = 20
    val_fraction: float = 0.1
    seed: int = 1337
    threads: int = None           # None = OpenMP's default (OMP_NUM_THREADS, or every core)
    log_interval: int = 10        # a metrics.jsonl line every this many steps
    sample_tokens: int = 400      # tokens of the sample printed at the end (0 = none)
    progress: bool = True         # a progress bar on a terminal, plain lines otherwise
    remeasure_machine: bool = False   # measure the matmul peak MFU is relative to again (gptcore.machine)
    report: bool = True           # RUN/report.html at evaluations and at the end (gptcore.visualize)
    keep_checkpoints: int = checkpoint.KEEP_CHECKPOINTS    # the newest this many checkpoints are kept

    def check(self):
        positive = ("max_iters", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "grad_accum",
                    "eval_interval", "eval_iters", "log_interval", "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GptcoreError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.n_embd % self.n_head != 0:
            raise GptcoreError(f"--n-embd {self.n_embd} must be divisible by --n-head {self.n_head}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise GptcoreError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        for name in ("beta1", "beta2", "dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise GptcoreError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_iters < 0 or (self.lr_decay_iters is not None and self.lr_decay_iters < 1):
            raise GptcoreError("--warmup-iters must be >= 0 and --lr-decay-iters >= 1")
        if not 0 < self.val_fraction < 1:
            raise GptcoreError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise GptcoreError(f"--threads must be in [1, {MAX_THREADS}], got {self.threads}")
        if not isinstance(self.out, str) or not self.out:
            raise GptcoreError("--out must name a folder, got an empty path")
        if self.sample_tokens < 0:
            raise GptcoreError(f"--sample-tokens must be >= 0, got {self.sample_tokens}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise GptcoreError(f"--tokenizer must be char, gpt2, bpe:N or a path, got {self.tokenizer!r}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise GptcoreError(f"--init-from must name a model folder, got {self.init_from!r}")
        if self.resume and self.overwrite:
            raise GptcoreError("pass --resume to continue the run in --out or --overwrite to replace it, not both")

    @property
    def decay_iters(self):
        """The step where the cosine decay ends."""
        return self.lr_decay_iters or self.max_iters


# the settings that describe a run (saved with it, restored on resume); out, resume, overwrite,
# progress and remeasure_machine say what to do with the run this time
RUN_SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                     if f.name not in ("out", "resume", "overwrite", "progress", "remeasure_machine"))
# the settings that fix the model's shape: a resumed run cannot change them
MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size")
# the files whose presence in --out means it holds a run (a run folder, or an older flat checkpoint)
RUN_FILES = (checkpoint.LATEST, checkpoint.CONFIG, checkpoint.MODEL, checkpoint.TRAINER_STATE)
LOCK_FILE = ".lock"
# each saved setting's type, for checking a trainer_state.json before it becomes a TrainConfig
_SETTING_TYPES = {field.name: field.type for field in dataclasses.fields(TrainConfig)}


def _saved_settings(saved):
    """trainer_state.json's "config" -> {setting: value} for the run settings it holds, with a
    lr_decay_iters of None made explicit (the saved max_iters), so the saved schedule is kept."""
    settings = {name: saved[name] for name in RUN_SETTINGS if name in saved}
    if settings.get("lr_decay_iters") is None and "max_iters" in settings:
        settings["lr_decay_iters"] = settings["max_iters"]
    return settings


def resume_config(out, **given):
    """The TrainConfig that resumes the run saved in `out`: the run's saved settings, with the ones in
    `given` (TrainConfig field names) replacing them. Raises GptcoreError if `out` holds no run."""
    unknown = sorted(set(given) - set(RUN_SETTINGS) - {"progress", "overwrite", "remeasure_machine"})
    if unknown:
        raise TypeError(f"resume_config() got settings it does not know: {unknown}")
    saved = checkpoint.read_training_settings(out)
    _check_saved_settings(out, saved)
    settings = _saved_settings(saved)
    saved_tokenizer = settings.get("tokenizer", TrainConfig.tokenizer)     # runs from before --tokenizer: char
    if given.get("tokenizer", saved_tokenizer) != saved_tokenizer:
        raise GptcoreError(f"--tokenizer {given['tokenizer']} does not match the run in {out} (tokenizer "
                           f"{saved_tokenizer}): a resumed run keeps its tokenizer")
    return TrainConfig(**{**settings, **given, "out": out, "resume": True})


def init_from_config(init_from, **given):
    """The TrainConfig that fine-tunes the model in `init_from` (a Hugging Face GPT-2 folder, or a
    gptcore checkpoint or run folder): its shape and its tokenizer, block_size its context unless
    `given` asks for less, and the other settings from `given` (TrainConfig field names) or the
    defaults. Raises GptcoreError for a shape or tokenizer that contradicts the model."""
    unknown = sorted(set(given) - set(RUN_SETTINGS) - {"out", "progress", "overwrite", "remeasure_machine"})
    if unknown:
        raise TypeError(f"init_from_config() got settings it does not know: {unknown}")
    model_config = checkpoint.read_model_config(init_from)
    shape = {name: getattr(model_config, name) for name in MODEL_SHAPE}
    for name in ("n_layer", "n_head", "n_embd"):
        if name in given and given[name] != shape[name]:
            raise GptcoreError(f"--{name.replace('_', '-')} {given[name]} does not match the model in {init_from} "
                               f"({name} {shape[name]}): a fine-tuned model keeps its shape")
    block_size = given.get("block_size", model_config.block_size)
    if block_size > model_config.block_size:
        raise GptcoreError(f"--block-size {block_size} is more than the {model_config.block_size} positions "
                           f"the model in {init_from} has (n_positions); use at most {model_config.block_size}")
    if given.get("tokenizer", init_from) != init_from:
        raise GptcoreError(f"--tokenizer {given['tokenizer']}: a run with --init-from uses the initial model's "
                           f"tokenizer (its ids are what the weights mean); leave --tokenizer out")
    return TrainConfig(**{**given, **shape, "block_size": block_size, "tokenizer": init_from,
                          "init_from": init_from})


def _check_saved_settings(out, saved):
    """Every run setting in trainer_state.json's "config" has its TrainConfig type (the ranges are
    TrainConfig.check's), or one line naming the file and the field."""
    path = os.path.join(checkpoint.checkpoint_folder(out), checkpoint.TRAINER_STATE)
    for name in RUN_SETTINGS:
        if name not in saved or saved[name] is None:
            continue
        value, kind = saved[name], _SETTING_TYPES[name]
        if kind is float:       # an int is a float setting too: JSON writes 1.0 as 1.0, a hand as 1
            ok, wanted = (isinstance(value, (int, float)) and not isinstance(value, bool)
                          and math.isfinite(value)), "a finite number"
        elif kind is int:
            ok, wanted = (isinstance(value, int) and not isinstance(value, bool)
                          and abs(value) <= checkpoint.MAX_STEP), "an int"
        else:
            ok, wanted = isinstance(value, kind), f"a {kind.__name__}"
        if not ok:
            raise GptcoreError(f'{path}: "config.{name}" must be {wanted}, got {value!r:.80}')


@dataclass
class TrainResult:
    step: int                 # the step reached (max_iters unless interrupted)
    train_loss: float         # the last estimate (eval_iters batches), nan if never evaluated
    val_loss: float
    interrupted: bool
    seconds: float
    signal: int = None        # the signal that interrupted the run (signal.SIGINT, signal.SIGTERM)



# ----------------------------------------------------------------------------------------------------
# Setup: everything a run needs, built (or loaded) before the first step
# ----------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One training run: what setup() builds, and the step and best val loss the loop moves on."""
    config: TrainConfig
    corpus: CorpusReport          # what was read, for the header
    tokenizer: CharTokenizer      # or a BPETokenizer
    model: GPT
    optimizer: AdamW
    sampler: BatchSampler         # draws the training batches; its state is saved with each checkpoint
    train_ids: np.ndarray
    val_ids: np.ndarray
    metrics_path: str
    step: int = 0
    best_val: float = math.inf
    changed: list = dataclasses.field(default_factory=list)    # on resume: "name saved -> now", per setting
    lock: "RunLock" = None        # held until the run ends
    saved_step: int = None        # the step of the last good checkpoint (None: none yet)
    saved_path: str = None        # and its folder
    saves: int = 0                # the checkpoints this process wrote
    group: object = dataclasses.field(default_factory=distributed.SingleProcess)    # the ranks (distributed)
    dynamics: dict = None         # the statistics of the last recorded step (gptcore.dynamics), for its evaluation

    def last_good(self):
        """"the last good checkpoint is ..." for a message that stops the run."""
        if self.saved_path is None:
            return "there is no checkpoint yet"
        return f"the last good checkpoint is {self.saved_path} (step {self.saved_step})"


class RunLock:
    """An exclusive fcntl.flock on RUN/.lock, held for as long as the lock is open (the trainer's
    life). The lock file keeps the holder's pid for the message a second trainer gets; a lock file
    left by a dead process is harmless, because the kernel drops a flock when its process exits."""

    def __init__(self, folder):
        path = os.path.join(folder, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise GptcoreError(f"cannot write to --out {folder}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise GptcoreError(f"{folder} is in use by another gptcore train (pid {pid})") from None
        except OSError as e:
            os.close(fd)
            raise GptcoreError(f"cannot lock --out {folder}: {e.strerror or e}") from None
        with contextlib.suppress(OSError):      # the pid is for the message only
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _check_out_folder(config):
    """--out must be a folder (or not exist yet), and a new run must not silently replace another."""
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise GptcoreError(f"--out {config.out} is a file, not a folder")
    if config.resume and not os.path.isdir(config.out):
        raise GptcoreError(f"--out {config.out} does not exist: there is no run to resume")
    if not (config.resume or config.overwrite) and \
            any(os.path.exists(os.path.join(config.out, name)) for name in RUN_FILES):
        raise GptcoreError(f"{os.path.join(config.out, '')} already holds a training run: pass --resume to "
                           f"continue it or --overwrite to replace it")


def _check_model_shape(config, model, where, why):
    """A resumed (or fine-tuned) run keeps the checkpoint's model; a config asking for another shape
    is a mistake."""
    for name in MODEL_SHAPE:
        if getattr(config, name) != getattr(model.config, name):
            raise GptcoreError(f"--{name.replace('_', '-')} {getattr(config, name)} does not match {where} "
                               f"({name} {getattr(model.config, name)}): {why}")



def _changed_settings(config, saved):
    """The run settings in which `config` differs from the saved run's, as "name saved -> now"."""
    saved = _saved_settings(saved)
    return [f"{name} {saved[name]} -> {getattr(config, name)}" for name in RUN_SETTINGS
            if name in saved and saved[name] != getattr(config, name)]


def make_tokenizer(spec, text, val_fraction):
    """--tokenizer: "char" (the text's characters), "bpe:N" (N tokens trained on the training part of
    the text, the first 1 - val_fraction of its characters, so validation text stays unseen), or a
    name or path for gptcore.tokenizer.load_tokenizer ("gpt2", a folder, a .tiktoken file)."""
    if spec == "char":
        return CharTokenizer.from_text(text)
    if spec.startswith("bpe:"):
        size = spec[len("bpe:"):]
        if not size.isdigit():
            raise GptcoreError(f"--tokenizer {spec}: expected bpe:N with N an integer >= 256, e.g. bpe:4096")
        return BPETokenizer.train(text[:int(len(text) * (1 - val_fraction))], int(size))
    if os.path.isdir(spec):           # a run folder means its current checkpoint's tokenizer
        spec = checkpoint.checkpoint_folder(spec)
    return load_tokenizer(spec)


def setup(config, log=print, group=None):
    """Check `config`, read and encode the corpus, and build the model, the optimizer and the batch
    sampler, or load them from config.out to resume. Raises GptcoreError for bad input. Before the
    checks, config.out is created and locked (RUN/.lock, see RunLock); nothing else in it is written
    or deleted until every check has passed. `log` gets the warnings (lines of metrics.jsonl skipped).
    With a group of MPI ranks (gptcore.distributed), rank 0 alone checks, locks and writes config.out."""
    group = group or distributed.SingleProcess()
    config.check()
    threads = config.threads if config.threads is not None else group.default_threads()
    if threads is not None:
        set_num_threads(threads)
    if not group.is_root:
        return _setup_locked(config, None, log, group)
    _check_out_folder(config)
    # the lock comes before anything is read, so a second trainer cannot read a checkpoint the
    # first one is about to prune; taking it creates the folder (and RUN/.lock) and nothing else
    try:
        os.makedirs(config.out, exist_ok=True)
    except OSError as e:
        raise GptcoreError(f"cannot create --out {config.out}: {e.strerror or e}") from None
    lock = RunLock(config.out)
    try:
        return _setup_locked(config, lock, log, group)
    except BaseException:
        lock.release()
        raise


def _check_trainer_state(path, state):
    """The fields the trainer itself put into trainer_state.json ("step" and the optimizer's are
    gptcore.checkpoint's to check)."""
    best = state.get("best_val_loss")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))
                             or not (math.isfinite(best) or best == math.inf) or best < 0):
        raise GptcoreError(f'{path}: "best_val_loss" must be null or a number >= 0, got {str(best)[:80]}')
    if not isinstance(state.get("config", {}), dict):
        raise GptcoreError(f'{path}: "config" must be an object')


def _setup_locked(config, lock, log, group):
    # the vocabulary: the checkpoint's when resuming (the ids must mean the same), else the corpus's
    if config.resume:
        model, tokenizer = checkpoint.load_model(config.out)
        _check_model_shape(config, model, f"the run in {config.out}", "a resumed run keeps its model's shape")
    text, corpus = read_corpus(config.data, config.glob)
    if config.init_from is not None and not config.resume:
        model, tokenizer = checkpoint.load_model(config.init_from, block_size=config.block_size, log=log)
        _check_model_shape(config, model, f"the model in {config.init_from}",
                           "pass the settings init_from_config gives")
    elif not config.resume:
        tokenizer = make_tokenizer(config.tokenizer, text, config.val_fraction)
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=config.block_size,
                              n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd),
                    seed=config.seed)
    train_ids, val_ids = split_tokens(np.asarray(tokenizer.encode(text), np.int64), config.val_fraction)
    block_size = model.config.block_size
    for name, part in (("training", train_ids), ("validation", val_ids)):
        if len(part) < block_size + 1:
            raise GptcoreError(f"the {name} split has {len(part)} tokens, fewer than one window of "
                               f"block_size + 1 = {block_size + 1}: use more text or a smaller --block-size")
    optimizer = AdamW(model.params, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8,
                      weight_decay=config.weight_decay, backend=model.backend)
    run = Run(config=config, corpus=corpus, tokenizer=tokenizer, model=model, optimizer=optimizer,
              sampler=BatchSampler(train_ids, config.batch_size, block_size, seed=group.sampler_seed(config.seed)),
              train_ids=train_ids, val_ids=val_ids, metrics_path=os.path.join(config.out, "metrics.jsonl"),
              lock=lock, group=group)
    if config.resume:
        folder = checkpoint.checkpoint_folder(config.out)
        path = os.path.join(folder, checkpoint.TRAINER_STATE)
        state = checkpoint.load_training_state(config.out, model, optimizer)
        _check_trainer_state(path, state)
        run.step, run.best_val = state["step"], state.get("best_val_loss") or math.inf
        sampler_state = _rank_sampler_state(path, state, group)
        try:
            run.sampler.set_state(sampler_state)
        except GptcoreError as e:
            raise GptcoreError(f'{path}: "sampler": {e}') from None
        run.changed = _changed_settings(config, state.get("config") or {})
        run.saved_step, run.saved_path = run.step, folder
    if not group.is_root:
        return run
    # every check has passed: from here on we write into config.out
    try:
        remove_leftover_temp_files(config.out, ("metrics.jsonl", "report.html"))   # of a killed rewrite
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(config.out, "loss.png.tmp.png"))
        if config.resume:
            _truncate_metrics(run.metrics_path, run.step, log)
        else:
            for name in (run.metrics_path, os.path.join(config.out, SAMPLES)):     # an overwritten run's
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
    except OSError as e:
        raise GptcoreError(f"cannot write {run.metrics_path}: {e.strerror or e}") from None
    return run


def _rank_sampler_state(path, state, group):
    """This rank's saved sampler state. A run of N ranks saves a list of N states ("sampler") and
    "ranks": N; it resumes with the same N only, since each rank's batch stream continues its own."""
    saved_ranks = state.get("ranks", 1)
    if saved_ranks != group.size:
        raise GptcoreError(f"{path}: the run was trained on {saved_ranks} rank{'s' if saved_ranks != 1 else ''} "
                           f"and this is {group.size}: resume it with the same number of ranks "
                           f"({'mpiexec -n ' + str(saved_ranks) + ' gptcore train' if saved_ranks > 1 else 'no mpiexec'})")
    if group.size == 1:
        return state.get("sampler")
    samplers = state.get("sampler")
    if not isinstance(samplers, list) or len(samplers) != group.size:
        raise GptcoreError(f'{path}: "sampler" must be a list of {group.size} states, one per rank')
    return samplers[group.rank]


def save(run):
    """A checkpoint of the run as it is now: a new folder in config.out/checkpoints, made current
    atomically (gptcore.checkpoint.save_run_checkpoint). A model or state that holds NaN or inf is
    not saved, and a disk that refuses the save stops the run: GptcoreError, one line naming the
    last good checkpoint, which stays current."""
    if run.saved_step == run.step:          # this state is saved already (e.g. interrupted at an eval)
        return
    samplers = run.group.gather(run.sampler.state())      # every rank's, on rank 0
    if run.group.is_root:
        _save_on_root(run, samplers)
    run.saves += 1
    run.saved_step, run.saved_path = run.step, run.group.bcast(run.saved_path)


def _save_on_root(run, samplers):
    state = {"step": run.step, "sampler": samplers[0] if run.group.size == 1 else samplers,
             "best_val_loss": None if math.isinf(run.best_val) else run.best_val,
             "config": dataclasses.asdict(run.config)}
    if run.group.size > 1:
        state["ranks"] = run.group.size
    out = run.config.out
    try:
        # the first save of a new run (--overwrite) keeps none of the old run's checkpoints
        path = checkpoint.save_run_checkpoint(out, run.model, run.tokenizer, run.optimizer, state,
                                              keep=run.config.keep_checkpoints,
                                              replace=run.saves == 0 and not run.config.resume)
    except ValueError as e:                 # a NaN or inf tensor
        raise GptcoreError(f"step {run.step}: not saved, {e}; {run.last_good()}") from None
    except OSError as e:
        raise GptcoreError(f"cannot write checkpoint to {os.path.join(out, checkpoint.CHECKPOINTS)}: "
                           f"{(e.strerror or str(e)).lower()}; {run.last_good()}") from None
    if run.saves == 0 and not run.config.resume:
        # an older flat checkpoint replaced by --overwrite: its files would only mislead
        for name in (*checkpoint.CHECKPOINT_FILES, checkpoint.MANIFEST):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, name))
    run.saved_path = path


# ----------------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------------

def train_step(run, record_dynamics=False):
    """One optimizer step at the optimizer's current learning rate: grad_accum micro-batches forward and
    backward, the global gradient norm clipped, one AdamW update. Returns the mean loss of the
    micro-batches and advances run.step. With record_dynamics, run.dynamics gets the step's statistics
    (gptcore.dynamics: gradients before clipping, update/weight ratios, block outputs, attention)."""
    config = run.config
    loss = 0.0
    for micro in range(config.grad_accum):
        # every micro-batch of the run, on every rank, draws its own dropout masks, from (seed, its
        # number in the run): a resumed run knows its step, so it draws what the uninterrupted run
        # would have drawn; with one process the number is step * grad_accum + micro
        counter = (run.step * config.grad_accum + micro) * run.group.size + run.group.rank
        dropout = Dropout(config.dropout, config.seed, counter) if config.dropout > 0 else None
        _, micro_loss = run.model.forward(*run.sampler.next_batch(), dropout=dropout)
        grads = run.model.backward(accumulate=micro > 0, loss_scale=1.0 / config.grad_accum)
        loss += micro_loss / config.grad_accum
    if not math.isfinite(loss):
        raise GptcoreError(f"the loss became {loss} at step {run.step}: lower --lr or keep --grad-clip on; "
                           f"{run.last_good()}")
    # data parallel: every rank's gradient (and loss) replaced by the mean over the ranks
    loss = run.group.average(run.model.flat_grads, loss)
    dynamics = StepDynamics.before_update(run.model, grads) if record_dynamics else None
    # clipping at grad_clip (0: none) is folded into the update (gptcore.optim.AdamW.step)
    run.optimizer.step(grads, max_norm=config.grad_clip if config.grad_clip > 0 else None)
    if dynamics is not None:
        run.dynamics = {"step": run.step + 1, **dynamics.after_update(run.model)}
    run.step += 1
    return loss


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

def estimate_loss(model, tokens, config, step):
    """Mean loss over eval_iters random batches of `tokens`, drawn from a generator seeded by
    (seed, step), so that evaluating never consumes the training sampler's random numbers."""
    sampler = BatchSampler(tokens, config.batch_size, model.config.block_size, seed=[config.seed, step])
    return float(np.mean([model.forward(*sampler.next_batch(), need_backward=False)[1]
                          for _ in range(config.eval_iters)]))


def evaluate(model, tokens, batch_size=32):
    """The mean cross-entropy (nats per token) over every complete non-overlapping window of tokens:
    each token but the first is predicted exactly once. Deterministic."""
    total, count = 0.0, 0
    for x, y in eval_windows(tokens, model.config.block_size, batch_size):
        _, loss = model.forward(x, y, need_backward=False)
        total += loss * y.size
        count += y.size
    return total / count


# ----------------------------------------------------------------------------------------------------
# Reporting: the header, progress, metrics.jsonl, loss.png, the sample
# ----------------------------------------------------------------------------------------------------

def _dynamics_of(run):
    """{"dynamics": ...} for the evaluation at run.step, if the step that led to it was recorded (not at
    step 0, nor where a run resumed: that step ran in an earlier process); else {}."""
    dynamics, run.dynamics = run.dynamics, None
    if dynamics is None or dynamics["step"] != run.step:
        return {}
    return {"dynamics": {name: value for name, value in dynamics.items() if name != "step"}}


def _evaluates(config, step):
    """Whether the loop evaluates (and saves) at `step`."""
    return step % config.eval_interval == 0 or step == config.max_iters


def _truncate_metrics(path, before_step, log=print):
    """On resume, drop the lines a previous run wrote after its last checkpoint, and the lines that
    cannot be read (cut short by a crash, not UTF-8, no "step"), with a warning; the file is
    rewritten atomically."""
    if not os.path.exists(path):
        return
    records, skipped = read_json_lines(path)
    if skipped:
        log(f"warning: {path}: skipped {skipped} line{'s' if skipped > 1 else ''} that could not be read")
    # the save at step s happened after step s's training line and before its evaluation
    kept = [r for r in records if r["step"] < before_step or (r["step"] == before_step and not r.get("eval"))]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))


def plot_losses(metrics_path, png_path, unit="character"):
    """loss.png: training loss at every logged step, validation loss at every evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, _ = read_json_lines(metrics_path) if os.path.exists(metrics_path) else ([], 0)
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    train = [(r["step"], r["train_loss"]) for r in records if number(r.get("train_loss"))]
    val = [(r["step"], r["val_loss"]) for r in records if number(r.get("val_loss"))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train (batch)", linewidth=0.8, alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(f"cross-entropy (nats per {unit})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    temporary = png_path + ".tmp.png"
    try:
        fig.savefig(temporary)
        os.replace(temporary, png_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    finally:
        plt.close(fig)


# At most this share of a run's time goes to redrawing report.html at its evaluations (Report.html).
REPORT_TIME_SHARE = 0.05


class Report:
    """What a run shows and leaves behind. On a terminal (stderr is a tty) progress is a tqdm bar on
    stderr; otherwise (a log file, a pipe) a bar's carriage-return updates would turn the log into one
    long line, so progress is a plain line every log_interval steps instead. progress=False shows
    neither. Every log_interval steps and at every evaluation a line goes to metrics.jsonl.

    Speed is measured over the log_interval steps since the last line (the evaluations and
    checkpoints among them included) as tokens/s, and as MFU: model FLOPs per second (tokens/s
    times GPT.flops_per_token) over the matmul peak gptcore.machine measured on this machine and
    thread count, a fraction (0.41 is 41%). With N MPI ranks the peak is N times rank 0's, each
    rank taken to be like rank 0."""

    def __init__(self, run, log, started):
        self.config, self.log, self.started = run.config, log, started
        self.report_seconds = 0.0       # spent drawing report.html so far (html)
        self.bar = None
        if run.config.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=run.config.max_iters, initial=run.step, unit="step", dynamic_ncols=True,
                            leave=False)
        self.say = self.bar.write if self.bar is not None else log
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.tokens_per_step = (run.group.size * run.config.batch_size * run.model.config.block_size
                                * run.config.grad_accum)
        self.flops_per_token = run.model.flops_per_token()
        self.peak_flops = None          # FLOP/s of every rank's matmuls together, from the header on
        self.resumed_from = run.step if run.config.resume else None    # marked on this process's first line

    def header(self, run):
        config, model = self.config, run.model
        self.log(f"data: {run.corpus}")
        self.log(f"tokens: {len(run.train_ids):,} train, {len(run.val_ids):,} validation; vocabulary "
                 f"{run.tokenizer.vocab_size} {run.tokenizer.unit}s"
                 + (f" ({self.config.tokenizer})" if self.config.tokenizer != "char" else ""))
        self.log(f"model: {model.num_parameters:,} parameters, {model.config.n_layer} layers, "
                 f"{model.config.n_head} heads, n_embd {model.config.n_embd}, block_size "
                 f"{model.config.block_size}; {get_num_threads()} threads"
                 + (" per rank" if run.group.size > 1 else "")
                 + (f"; initialized from {config.init_from}" if config.init_from is not None else ""))
        self._machine_peak(run)
        if run.group.size > 1:
            self.log(f"data parallel: {run.group.describe()}, each on its own batches; global batch "
                     f"{run.group.size} ranks x {config.batch_size} x {config.grad_accum} micro-batches = "
                     f"{run.group.size * config.batch_size * config.grad_accum} sequences a step "
                     f"(--batch-size is per rank)")
        self.log(f"training: {config.max_iters} steps of {config.batch_size} x {model.config.block_size} tokens"
                 f"{f' x {config.grad_accum} micro-batches' if config.grad_accum > 1 else ''}, lr {config.lr:g} "
                 f"-> {config.min_lr:g} (warmup {config.warmup_iters}, decay to step {config.decay_iters}), "
                 f"dropout {config.dropout:g}"
                 f"{f', resuming at step {run.step}' if config.resume else ''}")
        if config.resume:
            self.log(f"resumed with the settings saved in {config.out}"
                     + (f", except: {', '.join(run.changed)}" if run.changed else ""))
        if config.max_iters < config.warmup_iters:
            self.log(f"warning: --max-iters {config.max_iters} ends before the warmup of {config.warmup_iters} "
                     f"steps does: the learning rate never reaches --lr {config.lr:g}")
        elif config.resume and config.decay_iters < config.max_iters:
            self.log(f"note: the learning rate stays at --min-lr {config.min_lr:g} after step "
                     f"{config.decay_iters}, where the decay ends (--lr-decay-iters moves it)")

    def _machine_peak(self, run):
        """The header's MFU line: the matmul peak, from gptcore.machine's cache or measured now
        (before the first step, so no step's speed includes the measurement)."""
        remeasure = self.config.remeasure_machine
        if remeasure or not machine.is_cached(machine.MATMUL):
            self.log(f"measuring this machine's matmul peak for MFU (kept in {machine.cache_path()}; "
                     f"--remeasure-machine measures it again)")
        peak = machine.matmul_peak(remeasure=remeasure, log=self.log)
        self.peak_flops = run.group.size * peak
        self.log(f"MFU: {self.flops_per_token / 1e6:,.2f} MFLOP a token (6 x parameters + 12 x layers x "
                 f"n_embd x block_size) over a matmul peak of {peak / 1e9:,.1f} GFLOP/s on "
                 f"{get_num_threads()} threads" + (f" per rank, x {run.group.size} ranks" if run.group.size > 1 else ""))
        self.window_start = time.perf_counter()

    def _append(self, run, record):
        if self.resumed_from is not None:       # where the report's loss curves mark the resume
            record, self.resumed_from = {**record, "resumed_from": self.resumed_from}, None
        try:
            append_json_line(run.metrics_path, record)
        except OSError as e:
            raise GptcoreError(f"cannot write {run.metrics_path}: {(e.strerror or str(e)).lower()}; "
                               f"{run.last_good()}") from None

    def evaluation(self, run, train_loss, val_loss):
        self.say(f"step {run.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        self._append(run, {
            "step": run.step, "train_loss": train_loss, "val_loss": val_loss, "lr": run.optimizer.lr,
            "tokens_per_sec": None, "mfu": None, "elapsed": time.perf_counter() - self.started, "eval": True,
            **_dynamics_of(run)})

    def step(self, run, loss):
        self.window_tokens += self.tokens_per_step
        if self.bar is not None:
            self.bar.update(1)
        if run.step % self.config.log_interval != 0:
            return
        now = time.perf_counter()
        tokens_per_sec = self.window_tokens / (now - self.window_start)
        self.window_start, self.window_tokens = now, 0
        mfu = tokens_per_sec * self.flops_per_token / self.peak_flops
        lr = run.optimizer.lr
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}",
                                 mfu=f"{mfu:.0%}")
        elif self.config.progress:
            self.log(f"step {run.step}/{self.config.max_iters}: loss {loss:.4f}, lr {lr:.2e}, "
                     f"{tokens_per_sec:,.0f} tokens/s, MFU {mfu:.0%}")
        self._append(run, {
            "step": run.step, "train_loss": loss, "val_loss": None, "lr": lr, "tokens_per_sec": tokens_per_sec,
            "mfu": mfu, "elapsed": now - self.started, "eval": False})

    def html(self, run, final):
        """RUN/report.html (gptcore.visualize.write_run_report), written atomically: the run's curves
        and statistics; at the end (final) also the model's pictures, on the validation text's start.
        Drawing it takes matplotlib about a second, as long as hundreds of baby-GPT steps, so at an
        evaluation it is redrawn only while the time spent drawing stays under REPORT_TIME_SHARE of
        the run's time so far; the one at the end is always drawn."""
        if not self.config.report:
            return
        drawing_started = time.perf_counter()
        if not final and self.report_seconds > REPORT_TIME_SHARE * (drawing_started - self.started):
            return
        from gptcore import visualize
        path = os.path.join(self.config.out, visualize.REPORT)
        prompt = run.val_ids[:min(visualize.TRAIN_REPORT_TOKENS, run.model.config.block_size)] if final else None
        try:
            visualize.write_run_report(self.config.out, run.model, run.tokenizer, prompt)
        except OSError as e:        # the checkpoint is saved; a missing report is worth a warning only
            self.log(f"warning: cannot write {path}: {e.strerror or e}")
        except Exception as e:      # nor does a picture that cannot be drawn stop the training
            self.log(f"warning: {path} not written: {type(e).__name__}: {e}")
        self.report_seconds += time.perf_counter() - drawing_started

    def sample(self, run, text):
        """The sample goes to the log and to RUN/samples.jsonl (the report shows it)."""
        self.log("sample:\n" + "-" * 60 + "\n" + text + "\n" + "-" * 60)
        try:
            append_json_line(os.path.join(self.config.out, SAMPLES), {"step": run.step, "sample": text})
        except OSError as e:
            self.log(f"warning: cannot write {os.path.join(self.config.out, SAMPLES)}: {e.strerror or e}")

    def close(self, run):
        if self.bar is not None:
            self.bar.close()
        try:
            plot_losses(run.metrics_path, os.path.join(self.config.out, "loss.png"), run.tokenizer.unit)
        except OSError as e:        # the checkpoint is saved; a missing plot is worth a warning only
            self.log(f"warning: cannot write {os.path.join(self.config.out, 'loss.png')}: {e.strerror or e}")

    def finished(self, run, result):
        config = self.config
        if result.interrupted:
            self.log(f"interrupted by {signal.Signals(result.signal).name} at step {run.step}: checkpoint "
                     f"saved to {run.saved_path}; continue with --resume --out {config.out}")
            return
        self.log(f"done: {run.step} steps in {result.seconds:.1f} s; final train loss {result.train_loss:.4f}, "
                 f"val loss {result.val_loss:.4f}; checkpoint, metrics.jsonl, loss.png"
                 f"{' and report.html' if config.report else ''} in {config.out}")
        if config.sample_tokens > 0:
            tokenizer = run.tokenizer
            prompt = tokenizer.default_prompt
            sample = tokenizer.decode(list(generate(run.model, np.asarray(tokenizer.encode(prompt)).tolist(),
                                                    config.sample_tokens, temperature=0.8, top_k=None,
                                                    seed=config.seed)))
            self.sample(run, sample)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------

class _NoReport:
    """What an MPI rank other than rank 0 shows and writes: nothing (rank 0 reports for the job)."""

    def header(self, run):
        pass

    def evaluation(self, run, train_loss, val_loss):
        pass

    def step(self, run, loss):
        pass

    def close(self, run):
        pass

    def finished(self, run, result):
        pass

    def html(self, run, final):
        pass


class _StopFlag:
    """Turns the first SIGINT or SIGTERM into a request to stop after the current step. A second one
    raises KeyboardInterrupt, except while `saving()`: a signal then only asks again, and the save
    finishes (a checkpoint is never left to a signal's mercy)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = None           # the signal that asked us to stop
        self.previous = {}
        self.in_save = False

    def __enter__(self):
        def handler(signum, frame):
            if self.requested is not None and not self.in_save:
                raise KeyboardInterrupt
            if self.requested is None:
                self.requested = signum
        try:
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, handler)
        except ValueError:          # not the main thread: leave the signals alone
            pass
        return self

    @contextlib.contextmanager
    def saving(self):
        self.in_save = True
        try:
            yield
        finally:
            self.in_save = False

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


def train(config, log=print):
    """Run a training job; returns a TrainResult. Raises GptcoreError for bad input, for a run that
    diverges and for a disk that refuses a checkpoint. To resume a run with its saved settings, pass
    resume_config(out, ...) as `config`."""
    started = time.perf_counter()
    group = distributed.connect()   # one process, or the ranks of `mpiexec -n N`
    with _StopFlag() as stop:       # from the start: a SIGTERM during setup still ends in one line
        run = group.all_or_none(lambda: setup(config, log, group), undo=_release_lock)
        try:
            with group.stop_everyone_on_failure("gptcore train"):
                result = _train_loop(run, stop, log, started)
                return group.bcast(result)      # rank 0's (the losses it evaluated), on every rank
        finally:
            _release_lock(run)


def _release_lock(run):
    if run.lock is not None:
        run.lock.release()


def _train_loop(run, stop, log, started):
    config = run.config
    report = Report(run, log, started) if run.group.is_root else _NoReport()
    report.header(run)
    train_loss = val_loss = math.nan
    while True:
        run.optimizer.lr = cosine_lr(run.step, config.lr, config.min_lr, config.warmup_iters,
                                     config.decay_iters)
        if _evaluates(config, run.step):
            if run.group.is_root:       # the other ranks wait for it in save's gather
                train_loss = estimate_loss(run.model, run.train_ids, config, run.step)
                val_loss = estimate_loss(run.model, run.val_ids, config, run.step)
                if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                    raise GptcoreError(f"the evaluation at step {run.step} is not finite (train loss "
                                       f"{train_loss}, val loss {val_loss}): not saved; {run.last_good()}; "
                                       f"lower --lr")
                run.best_val = min(run.best_val, val_loss)
                report.evaluation(run, train_loss, val_loss)
            with stop.saving():
                save(run)
            if run.step < config.max_iters:       # the last one is written at the end, below
                report.html(run, final=False)
        stop.requested = run.group.stop_signal(stop.requested)     # every rank stops at the same step
        if run.step >= config.max_iters or stop.requested is not None:
            break
        loss = train_step(run, record_dynamics=_evaluates(config, run.step + 1))
        report.step(run, loss)
    interrupted = run.step < config.max_iters        # only a signal ends the loop early
    if interrupted:
        with stop.saving():
            save(run)
    report.close(run)
    result = TrainResult(step=run.step, train_loss=train_loss, val_loss=val_loss, interrupted=interrupted,
                         seconds=time.perf_counter() - started, signal=stop.requested if interrupted else None)
    report.finished(run, result)
    report.html(run, final=True)
    return result
