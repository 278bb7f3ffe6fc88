"""gptcore.train: the training loop behind `gptcore train`, and the evaluation behind `gptcore eval`.

WHAT'S GOING ON HERE
====================

WHAT
  train(TrainConfig(...)) does what nanoGPT's train.py does, as a function you can import and test:
    1. read the corpus (a file, a folder, or by default this Python's own standard library source),
       build the character vocabulary, encode, and split off the last 10% as validation;
    2. build a GPT and AdamW (weight decay on the matrices only), or load both from --out to resume;
    3. loop: every eval_interval steps estimate train and val loss on eval_iters random batches and
       save a checkpoint; each step sets the learning rate (warmup, then cosine decay), runs
       grad_accum micro-batches forward and backward (their gradients add up to the gradient of the
       mean loss over all of them), clips the global gradient norm, and takes an AdamW step;
    4. print a sample, and leave metrics.jsonl and loss.png (drawn once, at the end) in the output
       folder.

  evaluate(model, tokens) is the deterministic loss `gptcore eval` reports: the mean cross-entropy over
  every complete, non-overlapping window of the text, every target token counted once.

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
import time
from dataclasses import dataclass

import numpy as np

from gptcore import checkpoint
from gptcore.data import BatchSampler, eval_windows, read_corpus, split_tokens
from gptcore.errors import GptcoreError
from gptcore.kernels import get_num_threads, set_num_threads
from gptcore.model import GPT, GPTConfig
from gptcore.optim import AdamW, clip_grad_norm, cosine_lr
from gptcore.sample import generate
from gptcore.tokenizer import CharTokenizer


@dataclass
class TrainConfig:
    """The settings of a training run, with nanoGPT's names and meanings. The defaults are nanoGPT's
    CPU "baby GPT" recipe for Shakespeare, characters (the README gives its measured time)."""
    data: str = None              # a text file or a folder; None = this Python's standard library source
    glob: str = "*.py"            # the files to read from a folder (recursively)
    out: str = "out"              # the checkpoint folder (config.json, model.safetensors, ...)
    resume: bool = False          # continue the run saved in `out`
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
    sample_tokens: int = 400      # characters of the sample printed at the end (0 = none)
    progress: bool = True         # the tqdm progress bar

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


@dataclass
class TrainResult:
    step: int                 # the step reached (max_iters unless interrupted)
    train_loss: float         # the last estimate (eval_iters batches), nan if never evaluated
    val_loss: float
    interrupted: bool
    seconds: float


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
# Output files
# ----------------------------------------------------------------------------------------------------

def _append_metrics(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path, before_step):
    """On resume, drop the lines a previous run wrote after its last checkpoint."""
    if not os.path.exists(path):
        return
    def written_before_the_save(record):
        # the save at step s happened after step s's training line and before its evaluation
        return record["step"] < before_step or (record["step"] == before_step and not record["eval"])

    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and written_before_the_save(json.loads(line))]
    checkpoint.atomic_write(path, "".join(kept).encode("utf-8"))


def plot_losses(metrics_path, png_path):
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
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    temporary = png_path + ".tmp.png"
    fig.savefig(temporary)
    plt.close(fig)
    os.replace(temporary, png_path)


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
    """Run a training job; returns a TrainResult. Raises GptcoreError for bad input."""
    config.check()
    if config.threads is not None:
        set_num_threads(config.threads)
    started = time.perf_counter()
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise GptcoreError(f"--out {config.out} is a file, not a folder")
    text, report = read_corpus(config.data, config.glob)

    # the vocabulary: from the corpus, or the checkpoint's when resuming (the ids must mean the same)
    if config.resume:
        model, tokenizer = checkpoint.load_model(config.out)
    else:
        tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    train_ids, val_ids = split_tokens(ids, config.val_fraction)
    if not config.resume:
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=config.block_size,
                              n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd),
                    seed=config.seed)
    block_size = model.config.block_size
    for name, part in (("training", train_ids), ("validation", val_ids)):
        if len(part) < block_size + 1:
            raise GptcoreError(f"the {name} split has {len(part)} tokens, fewer than one window of "
                               f"block_size + 1 = {block_size + 1}: use more text or a smaller --block-size")
    opt = AdamW(model.params, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8,
                weight_decay=config.weight_decay)
    sampler = BatchSampler(train_ids, config.batch_size, block_size, seed=config.seed)
    step, best_val = 0, math.inf
    os.makedirs(config.out, exist_ok=True)
    metrics_path = os.path.join(config.out, "metrics.jsonl")
    if config.resume:
        state = checkpoint.load_training_state(config.out, model, opt)
        step, best_val = state["step"], state.get("best_val_loss") or math.inf
        sampler.set_state(state["sampler"])
        _truncate_metrics(metrics_path, step)
    elif os.path.exists(metrics_path):
        os.unlink(metrics_path)
    decay_iters = config.lr_decay_iters or config.max_iters
    tokens_per_step = config.batch_size * block_size * config.grad_accum

    log(f"data: {report}")
    log(f"tokens: {len(train_ids):,} train, {len(val_ids):,} validation; vocabulary {tokenizer.vocab_size} "
        f"characters")
    log(f"model: {model.num_parameters:,} parameters, {model.config.n_layer} layers, {model.config.n_head} "
        f"heads, n_embd {model.config.n_embd}, block_size {block_size}; {get_num_threads()} threads")
    log(f"training: {config.max_iters} steps of {config.batch_size} x {block_size} tokens"
        f"{f' x {config.grad_accum} micro-batches' if config.grad_accum > 1 else ''}, lr {config.lr:g} -> "
        f"{config.min_lr:g} (warmup {config.warmup_iters}, decay to step {decay_iters})"
        f"{f', resuming at step {step}' if config.resume else ''}")

    def save():
        checkpoint.save_checkpoint(config.out, model, tokenizer, opt, {
            "step": step, "sampler": sampler.state(), "best_val_loss": None if math.isinf(best_val) else best_val,
            "config": dataclasses.asdict(config)})

    from tqdm import tqdm
    bar = tqdm(total=config.max_iters, initial=step, disable=not config.progress, unit="step",
               dynamic_ncols=True, leave=False)
    say = bar.write if config.progress else log
    train_loss = val_loss = math.nan
    loss = math.nan
    window_start, window_tokens = time.perf_counter(), 0
    interrupted = False
    with _StopFlag() as stop:
        while True:
            opt.lr = cosine_lr(step, config.lr, config.min_lr, config.warmup_iters, decay_iters)
            if step % config.eval_interval == 0 or step == config.max_iters:
                train_loss = estimate_loss(model, train_ids, config, step)
                val_loss = estimate_loss(model, val_ids, config, step)
                best_val = min(best_val, val_loss)
                say(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
                _append_metrics(metrics_path, {"step": step, "train_loss": train_loss, "val_loss": val_loss,
                                               "lr": opt.lr, "tokens_per_sec": None,
                                               "elapsed": time.perf_counter() - started, "eval": True})
                save()
            if step >= config.max_iters:
                break
            if stop.requested:
                interrupted = True
                break
            # one optimizer step (at the learning rate set above): grad_accum micro-batches, clipping, AdamW
            loss = 0.0
            for micro in range(config.grad_accum):
                _, micro_loss = model.forward(*sampler.next_batch())
                grads = model.backward(accumulate=micro > 0, loss_scale=1.0 / config.grad_accum)
                loss += micro_loss / config.grad_accum
            if not math.isfinite(loss):
                raise GptcoreError(f"the loss became {loss} at step {step}: lower --lr or keep --grad-clip on")
            if config.grad_clip > 0:
                clip_grad_norm(grads, config.grad_clip)
            opt.step(grads)
            step += 1
            window_tokens += tokens_per_step
            bar.update(1)
            if step % config.log_interval == 0:
                now = time.perf_counter()
                tokens_per_sec = window_tokens / (now - window_start)
                window_start, window_tokens = now, 0
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{opt.lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")
                _append_metrics(metrics_path, {"step": step, "train_loss": loss, "val_loss": None, "lr": opt.lr,
                                               "tokens_per_sec": tokens_per_sec,
                                               "elapsed": now - started, "eval": False})
        if interrupted:
            save()
    bar.close()
    plot_losses(metrics_path, os.path.join(config.out, "loss.png"))
    seconds = time.perf_counter() - started
    if interrupted:
        log(f"interrupted at step {step}: checkpoint saved to {config.out}")
    else:
        log(f"done: {step} steps in {seconds:.1f} s; final train loss {train_loss:.4f}, val loss {val_loss:.4f}; "
            f"checkpoint, metrics.jsonl and loss.png in {config.out}")
        if config.sample_tokens > 0:
            prompt = "\n" if "\n" in tokenizer.chars else tokenizer.chars[0]
            sample = tokenizer.decode(list(generate(model, tokenizer.encode(prompt).tolist(), config.sample_tokens,
                                                    temperature=0.8, top_k=None, seed=config.seed)))
            log("sample:\n" + "-" * 60 + "\n" + sample + "\n" + "-" * 60)
    return TrainResult(step=step, train_loss=train_loss, val_loss=val_loss, interrupted=interrupted,
                       seconds=seconds)
