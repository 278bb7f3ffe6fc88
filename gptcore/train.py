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
                  add up to the gradient of the mean loss over all of them), clip the global gradient
                  norm, AdamW;
    estimate_loss every eval_interval steps, train and val loss on eval_iters random batches, and a
                  checkpoint (save);
    Report        what the user sees: the header, a progress bar on a terminal or plain lines in a
                  log file, metrics.jsonl, loss.png (drawn once, at the end) and a sample.
  The learning rate of each step follows warmup, then cosine decay (gptcore.optim.cosine_lr).

  evaluate(model, tokens) is the deterministic loss `gptcore eval` reports: the mean cross-entropy over
  every complete, non-overlapping window of the text, every target token counted once.

  A new run refuses an --out folder that already holds a run (config.json, model.safetensors or
  trainer_state.json) unless it is told to resume it or to overwrite it (TrainConfig.overwrite).

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

  Ctrl-C sets a flag that the loop checks between steps; it then saves a checkpoint and stops with
  exit status 130. A second Ctrl-C interrupts at once (the previous checkpoint stays intact: saves are
  atomic).
"""
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from gptcore import checkpoint
from gptcore.data import BatchSampler, CorpusReport, eval_windows, read_corpus, split_tokens
from gptcore.errors import GptcoreError
from gptcore.files import append_json_line, atomic_write
from gptcore.kernels import get_num_threads, set_num_threads
from gptcore.model import GPT, GPTConfig
from gptcore.optim import AdamW, clip_grad_norm, cosine_lr
from gptcore.sample import generate
from gptcore.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer


@dataclass
class TrainConfig:
    """The settings of a training run, with nanoGPT's names and meanings. The defaults are nanoGPT's
    CPU "baby GPT" recipe for Shakespeare, characters (the README gives its measured time)."""
    data: str = None              # a text file or a folder; None = this Python's standard library source
    glob: str = "*.py"            # the files to read from a folder (recursively)
    out: str = "out"              # the checkpoint folder (config.json, model.safetensors, ...)
    resume: bool = False          # continue the run saved in `out` (see resume_config)
    overwrite: bool = False       # replace a run already saved in `out`
    tokenizer: str = "char"       # char, gpt2, bpe:N (N tokens trained on the training text) or a path
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
    grad_accum: int = 1           # micro-batches per step
    eval_interval: int = 250
    eval_iters: int = 20
    val_fraction: float = 0.1
    seed: int = 1337
    threads: int = None           # None = OpenMP's default (OMP_NUM_THREADS, or every core)
    log_interval: int = 10        # a metrics.jsonl line every this many steps
    sample_tokens: int = 400      # tokens of the sample printed at the end (0 = none)
    progress: bool = True         # a progress bar on a terminal, plain lines otherwise

    def check(self):
        positive = ("max_iters", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "grad_accum",
                    "eval_interval", "eval_iters", "log_interval")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GptcoreError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.n_embd % self.n_head != 0:
            raise GptcoreError(f"--n-embd {self.n_embd} must be divisible by --n-head {self.n_head}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise GptcoreError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise GptcoreError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_iters < 0 or (self.lr_decay_iters is not None and self.lr_decay_iters < 1):
            raise GptcoreError("--warmup-iters must be >= 0 and --lr-decay-iters >= 1")
        if not 0 < self.val_fraction < 1:
            raise GptcoreError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.threads is not None and self.threads < 1:
            raise GptcoreError(f"--threads must be >= 1, got {self.threads}")
        if self.sample_tokens < 0:
            raise GptcoreError(f"--sample-tokens must be >= 0, got {self.sample_tokens}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise GptcoreError(f"--tokenizer must be char, gpt2, bpe:N or a path, got {self.tokenizer!r}")
        if self.resume and self.overwrite:
            raise GptcoreError("pass --resume to continue the run in --out or --overwrite to replace it, not both")

    @property
    def decay_iters(self):
        """The step where the cosine decay ends."""
        return self.lr_decay_iters or self.max_iters


# the settings that describe a run (saved with it, restored on resume); out, resume, overwrite and
# progress say what to do with the run this time
RUN_SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                     if f.name not in ("out", "resume", "overwrite", "progress"))
# the settings that fix the model's shape: a resumed run cannot change them
MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size")
# the files whose presence in --out means it holds a run
RUN_FILES = (checkpoint.CONFIG, checkpoint.MODEL, checkpoint.TRAINER_STATE)


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
    unknown = sorted(set(given) - set(RUN_SETTINGS) - {"progress", "overwrite"})
    if unknown:
        raise TypeError(f"resume_config() got settings it does not know: {unknown}")
    settings = _saved_settings(checkpoint.read_training_settings(out))
    saved_tokenizer = settings.get("tokenizer", TrainConfig.tokenizer)     # runs from before --tokenizer: char
    if given.get("tokenizer", saved_tokenizer) != saved_tokenizer:
        raise GptcoreError(f"--tokenizer {given['tokenizer']} does not match the run in {out} (tokenizer "
                           f"{saved_tokenizer}): a resumed run keeps its tokenizer")
    return TrainConfig(**{**settings, **given, "out": out, "resume": True})


@dataclass
class TrainResult:
    step: int                 # the step reached (max_iters unless interrupted)
    train_loss: float         # the last estimate (eval_iters batches), nan if never evaluated
    val_loss: float
    interrupted: bool
    seconds: float



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


def _check_out_folder(config):
    """--out must be a folder (or not exist yet), and a new run must not silently replace another."""
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise GptcoreError(f"--out {config.out} is a file, not a folder")
    if not (config.resume or config.overwrite) and \
            any(os.path.exists(os.path.join(config.out, name)) for name in RUN_FILES):
        raise GptcoreError(f"{os.path.join(config.out, '')} already holds a training run: pass --resume to "
                           f"continue it or --overwrite to replace it")


def _check_model_shape(config, model):
    """A resumed run keeps the checkpoint's model; a config asking for another shape is a mistake."""
    for name in MODEL_SHAPE:
        if getattr(config, name) != getattr(model.config, name):
            raise GptcoreError(f"--{name.replace('_', '-')} {getattr(config, name)} does not match the run in "
                               f"{config.out} ({name} {getattr(model.config, name)}): a resumed run keeps its "
                               f"model's shape")


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
    return load_tokenizer(spec)


def setup(config):
    """Check `config`, read and encode the corpus, and build the model, the optimizer and the batch
    sampler, or load them from config.out to resume. Raises GptcoreError for bad input; nothing in
    config.out is written or deleted until every check has passed."""
    config.check()
    if config.threads is not None:
        set_num_threads(config.threads)
    _check_out_folder(config)
    # the vocabulary: the checkpoint's when resuming (the ids must mean the same), else the corpus's
    if config.resume:
        model, tokenizer = checkpoint.load_model(config.out)
        _check_model_shape(config, model)
    text, corpus = read_corpus(config.data, config.glob)
    if not config.resume:
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
              sampler=BatchSampler(train_ids, config.batch_size, block_size, seed=config.seed),
              train_ids=train_ids, val_ids=val_ids, metrics_path=os.path.join(config.out, "metrics.jsonl"))
    if config.resume:
        state = checkpoint.load_training_state(config.out, model, optimizer)
        run.step, run.best_val = state["step"], state.get("best_val_loss") or math.inf
        run.sampler.set_state(state["sampler"])
        run.changed = _changed_settings(config, state.get("config") or {})
    # every check has passed: from here on we write into config.out
    os.makedirs(config.out, exist_ok=True)
    if config.resume:
        _truncate_metrics(run.metrics_path, run.step)
    elif os.path.exists(run.metrics_path):
        os.unlink(run.metrics_path)
    return run


def save(run):
    """A checkpoint of the run as it is now, into config.out (every file atomically)."""
    checkpoint.save_checkpoint(run.config.out, run.model, run.tokenizer, run.optimizer, {
        "step": run.step, "sampler": run.sampler.state(),
        "best_val_loss": None if math.isinf(run.best_val) else run.best_val,
        "config": dataclasses.asdict(run.config)})


# ----------------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------------

def train_step(run):
    """One optimizer step at the optimizer's current learning rate: grad_accum micro-batches forward and
    backward, the global gradient norm clipped, one AdamW update. Returns the mean loss of the
    micro-batches and advances run.step."""
    config = run.config
    loss = 0.0
    for micro in range(config.grad_accum):
        _, micro_loss = run.model.forward(*run.sampler.next_batch())
        grads = run.model.backward(accumulate=micro > 0, loss_scale=1.0 / config.grad_accum)
        loss += micro_loss / config.grad_accum
    if not math.isfinite(loss):
        raise GptcoreError(f"the loss became {loss} at step {run.step}: lower --lr or keep --grad-clip on")
    if config.grad_clip > 0:
        clip_grad_norm(grads, config.grad_clip, backend=run.model.backend)
    run.optimizer.step(grads)
    run.step += 1
    return loss


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

def estimate_loss(model, tokens, config, step):
    """Mean loss over eval_iters random batches of `tokens`, drawn from a generator seeded by
    (seed, step), so that evaluating never consumes the training sampler's random numbers."""
    sampler = BatchSampler(tokens, config.batch_size, model.config.block_size, seed=[config.seed, step])
    return float(np.mean([model.forward(*sampler.next_batch())[1] for _ in range(config.eval_iters)]))


def evaluate(model, tokens, batch_size=32):
    """The mean cross-entropy (nats per token) over every complete non-overlapping window of tokens:
    each token but the first is predicted exactly once. Deterministic."""
    total, count = 0.0, 0
    for x, y in eval_windows(tokens, model.config.block_size, batch_size):
        _, loss = model.forward(x, y)
        total += loss * y.size
        count += y.size
    return total / count


# ----------------------------------------------------------------------------------------------------
# Reporting: the header, progress, metrics.jsonl, loss.png, the sample
# ----------------------------------------------------------------------------------------------------

def _truncate_metrics(path, before_step):
    """On resume, drop the lines a previous run wrote after its last checkpoint."""
    if not os.path.exists(path):
        return
    def written_before_the_save(line):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:    # a line cut short by a kill, which came after the last save
            return False
        # the save at step s happened after step s's training line and before its evaluation
        return record["step"] < before_step or (record["step"] == before_step and not record["eval"])

    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and written_before_the_save(line)]
    atomic_write(path, "".join(kept).encode("utf-8"))


def plot_losses(metrics_path, png_path, unit="character"):
    """loss.png: training loss at every logged step, validation loss at every evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
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
    fig.savefig(temporary)
    plt.close(fig)
    os.replace(temporary, png_path)


class Report:
    """What a run shows and leaves behind. On a terminal (stderr is a tty) progress is a tqdm bar on
    stderr; otherwise (a log file, a pipe) a bar's carriage-return updates would turn the log into one
    long line, so progress is a plain line every log_interval steps instead. progress=False shows
    neither. Every log_interval steps and at every evaluation a line goes to metrics.jsonl."""

    def __init__(self, run, log, started):
        self.config, self.log, self.started = run.config, log, started
        self.bar = None
        if run.config.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=run.config.max_iters, initial=run.step, unit="step", dynamic_ncols=True,
                            leave=False)
        self.say = self.bar.write if self.bar is not None else log
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.tokens_per_step = run.config.batch_size * run.model.config.block_size * run.config.grad_accum

    def header(self, run):
        config, model = self.config, run.model
        self.log(f"data: {run.corpus}")
        self.log(f"tokens: {len(run.train_ids):,} train, {len(run.val_ids):,} validation; vocabulary "
                 f"{run.tokenizer.vocab_size} {run.tokenizer.unit}s"
                 + (f" ({self.config.tokenizer})" if self.config.tokenizer != "char" else ""))
        self.log(f"model: {model.num_parameters:,} parameters, {model.config.n_layer} layers, "
                 f"{model.config.n_head} heads, n_embd {model.config.n_embd}, block_size "
                 f"{model.config.block_size}; {get_num_threads()} threads")
        self.log(f"training: {config.max_iters} steps of {config.batch_size} x {model.config.block_size} tokens"
                 f"{f' x {config.grad_accum} micro-batches' if config.grad_accum > 1 else ''}, lr {config.lr:g} "
                 f"-> {config.min_lr:g} (warmup {config.warmup_iters}, decay to step {config.decay_iters})"
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

    def evaluation(self, run, train_loss, val_loss):
        self.say(f"step {run.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        append_json_line(run.metrics_path, {
            "step": run.step, "train_loss": train_loss, "val_loss": val_loss, "lr": run.optimizer.lr,
            "tokens_per_sec": None, "elapsed": time.perf_counter() - self.started, "eval": True})

    def step(self, run, loss):
        self.window_tokens += self.tokens_per_step
        if self.bar is not None:
            self.bar.update(1)
        if run.step % self.config.log_interval != 0:
            return
        now = time.perf_counter()
        tokens_per_sec = self.window_tokens / (now - self.window_start)
        self.window_start, self.window_tokens = now, 0
        lr = run.optimizer.lr
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")
        elif self.config.progress:
            self.log(f"step {run.step}/{self.config.max_iters}: loss {loss:.4f}, lr {lr:.2e}, "
                     f"{tokens_per_sec:,.0f} tokens/s")
        append_json_line(run.metrics_path, {
            "step": run.step, "train_loss": loss, "val_loss": None, "lr": lr, "tokens_per_sec": tokens_per_sec,
            "elapsed": now - self.started, "eval": False})

    def close(self, run):
        if self.bar is not None:
            self.bar.close()
        plot_losses(run.metrics_path, os.path.join(self.config.out, "loss.png"), run.tokenizer.unit)

    def finished(self, run, result):
        config = self.config
        if result.interrupted:
            self.log(f"interrupted at step {run.step}: checkpoint saved to {config.out}")
            return
        self.log(f"done: {run.step} steps in {result.seconds:.1f} s; final train loss {result.train_loss:.4f}, "
                 f"val loss {result.val_loss:.4f}; checkpoint, metrics.jsonl and loss.png in {config.out}")
        if config.sample_tokens > 0:
            tokenizer = run.tokenizer
            prompt = tokenizer.default_prompt
            sample = tokenizer.decode(list(generate(run.model, np.asarray(tokenizer.encode(prompt)).tolist(),
                                                    config.sample_tokens, temperature=0.8, top_k=None,
                                                    seed=config.seed)))
            self.log("sample:\n" + "-" * 60 + "\n" + sample + "\n" + "-" * 60)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------

class _StopFlag:
    """Turns the first Ctrl-C into a request to stop after the current step; the second one raises."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
        try:
            self.previous = signal.signal(signal.SIGINT, handler)
        except ValueError:          # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(config, log=print):
    """Run a training job; returns a TrainResult. Raises GptcoreError for bad input. To resume a run
    with its saved settings, pass resume_config(out, ...) as `config`."""
    started = time.perf_counter()
    run = setup(config)
    report = Report(run, log, started)
    report.header(run)
    train_loss = val_loss = math.nan
    with _StopFlag() as stop:
        while True:
            run.optimizer.lr = cosine_lr(run.step, config.lr, config.min_lr, config.warmup_iters,
                                         config.decay_iters)
            if run.step % config.eval_interval == 0 or run.step == config.max_iters:
                train_loss = estimate_loss(run.model, run.train_ids, config, run.step)
                val_loss = estimate_loss(run.model, run.val_ids, config, run.step)
                run.best_val = min(run.best_val, val_loss)
                report.evaluation(run, train_loss, val_loss)
                save(run)
            if run.step >= config.max_iters or stop.requested:
                break
            loss = train_step(run)
            report.step(run, loss)
        interrupted = run.step < config.max_iters        # only Ctrl-C ends the loop early
        if interrupted:
            save(run)
    report.close(run)
    result = TrainResult(step=run.step, train_loss=train_loss, val_loss=val_loss, interrupted=interrupted,
                         seconds=time.perf_counter() - started)
    report.finished(run, result)
    return result
