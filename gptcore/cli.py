"""gptcore.cli: the `gptcore` command (also `python -m gptcore`): train, generate, eval, tokenize, visualize,
machine.

WHAT'S GOING ON HERE
====================
  gptcore train      [--data PATH] [--out DIR] [nanoGPT's flags...]   train a model (train.py), or
                     [--init-from DIR]                               fine-tune one (nanoGPT's init_from)
  gptcore generate   --model DIR --prompt TEXT [sampling flags]       continue a prompt (sample.py)
                     [--num-samples N]
  gptcore eval       --model DIR --data PATH                          loss, perplexity, bits/char
                                                                      (bits/byte for BPE)
  gptcore tokenize   [--tokenizer gpt2|PATH] TEXT                     the pieces a text becomes, with ids
  gptcore visualize  --model DIR --prompt TEXT [--out FOLDER]         pictures of the model's forward and
                                                                      of its run, in FOLDER/report.html
  gptcore machine    [--remeasure] [--threads N]                      the matmul peak and read bandwidth
                                                                      MFU and generate's roofline use
                                                                      (gptcore.machine)

`train` prints MFU (model FLOPs per second over the machine's matmul peak) as it goes, and `generate`
ends with its tokens/s as a fraction of the memory roofline (the read bandwidth over the bytes a
token reads); both yardsticks are measured once per machine and thread count and cached
(gptcore.machine). `train --remeasure-machine` measures the peak again before its run.

Each subcommand parses its flags into the same function a Python user would call. Errors a user can
cause (a missing file, a flag value that means nothing, a damaged checkpoint) arrive here as
GptcoreError and leave as one line on stderr and exit status 2, never a traceback; so do the flags
argparse rejects (a subcommand's parser prints one line, not its usage block), and so does an
OSError nothing below caught (a disk that fails under us). A signal that stops `train` (it saves
first, gptcore.train) exits 128 + its number, as a shell reports it: 130 for Ctrl-C (SIGINT), 143
for SIGTERM; Ctrl-C in generate or eval exits 130.

`mpiexec -n N gptcore train ...` trains on N data-parallel ranks (gptcore.distributed): every rank
parses the same flags, rank 0 alone prints a flag argparse rejects, and -epochs counts the tokens of
all N ranks' batches.

--model and --out take a run folder (RUN/latest names its newest checkpoint) or a checkpoint
folder, including the flat ones older gptcore versions wrote (gptcore.checkpoint); --model (and
train's --init-from) also a Hugging Face GPT-2 folder (gptcore.huggingface).

Flags are spelt out: argparse's prefix matching is off (`--max-iter` is an unknown flag, answered
with "did you mean --max-iters?"). Every dashed flag also answers to its underscored spelling, which
nanoGPT uses (`--max_iters=100` is `--max-iters 100`); those aliases are left out of --help.

`train` knows which flags were typed: its flags have no argparse default (argparse.SUPPRESS), so
only the typed ones reach the namespace. A new run fills the rest from TrainConfig's defaults; a
`--resume` fills them from the run's saved settings (gptcore.train.resume_config). `-epochs N` sets
--max-iters to N passes over the training tokens: epochs * training tokens / (batch_size *
block_size * grad_accum), rounded up, with the batch and block size the run will use (the saved
ones on resume); `-batch` and `-seq` are short for --batch-size and --block-size.
"""
import argparse
import codecs
import dataclasses
import difflib
import math
import os
import signal
import sys
import time

from gptcore.errors import GptcoreError, ReportedElsewhere

EXIT_USAGE = 2
SAMPLE_SEPARATOR = "-" * 60 + "\n"        # between two samples of generate --num-samples
EXIT_INTERRUPTED = 130


def _integer_at_least(minimum, maximum=None):
    """An argparse type: an integer >= minimum (and <= maximum, if given)."""
    wanted = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text[:80]!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value
    return parse


_positive_int = _integer_at_least(1)
_nonnegative_int = _integer_at_least(0)


def _threads(text):
    from gptcore.kernels import MAX_THREADS
    return _integer_at_least(1, MAX_THREADS)(text)


def _number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: errors are one line (`gptcore train: error: ...`), and an unknown flag
    is named with the known flag it abbreviates, or the closest one."""

    def error(self, message):
        from gptcore.distributed import launched_rank
        # under `mpiexec -n N` every rank parses the same flags: rank 0 alone says what is wrong
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n" if launched_rank() == 0 else None)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(self._unknown(extras))
        return namespace, extras

    def _unknown(self, extras):
        flag = next((arg.split("=")[0] for arg in extras if arg.startswith("-")), None)
        if flag is None:
            return f"unexpected argument {extras[0]!r}"
        known = [option for action in self._actions if action.help != argparse.SUPPRESS
                 for option in action.option_strings]
        # an abbreviation names the flag it starts; otherwise the nearest spelling (--max_iter, --n-embed)
        close = [option for option in known if option.startswith(flag)] or \
            difflib.get_close_matches(flag, known, n=1)
        return f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else
                                         f" ({self.prog} --help lists the flags)")


def _flag(parser, name, **kwargs):
    """parser.add_argument(name, ...), and for a dashed --long-name a hidden --long_name alias."""
    action = parser.add_argument(name, **kwargs)
    if name.startswith("--") and "-" in name[2:]:
        alias = {key: value for key, value in kwargs.items() if key not in ("required", "help", "default")}
        parser.add_argument("--" + name[2:].replace("-", "_"), dest=action.dest, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS, **alias)
    return action


def _parser():
    from gptcore.train import TrainConfig
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="gptcore", allow_abbrev=False,
                                     description="A GPT-2 written from scratch: train it, sample from it, "
                                     "evaluate it.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,generate,eval,tokenize,visualize,machine}",
                                     parser_class=_CommandParser)

    train = commands.add_parser("train", help="train a GPT, or fine-tune one (--init-from)", allow_abbrev=False,
                                description="Train a character-level GPT-2 (defaults: nanoGPT's CPU baby GPT). "
                                "Without --data it trains on this Python's standard library source. "
                                "With --resume, every flag not given here keeps the value saved with the run.")
    suppress = argparse.SUPPRESS     # no default: only the flags typed reach the namespace (see above)
    _flag(train, "--data", default=suppress, help="a text file, or a folder read recursively (see --glob) "
          "(default: the Python standard library)")
    _flag(train, "--glob", default=suppress, help=f"files to read from a --data folder (default {defaults.glob})")
    _flag(train, "--tokenizer", default=suppress, help="char (the text's characters), gpt2 (GPT-2's BPE), "
          "bpe:N (N tokens of BPE trained on the training text, e.g. bpe:4096), or a tokenizer folder or "
          f".tiktoken file (default {defaults.tokenizer})")
    _flag(train, "--out", default=suppress, help=f"run folder: checkpoints/, latest, metrics.jsonl, loss.png "
          f"(default {defaults.out})")
    _flag(train, "--resume", action="store_true", default=suppress,
          help="continue the run saved in --out with its saved settings; flags given here replace them, "
          "except the model's shape (--n-layer, --n-head, --n-embd, --block-size), which cannot change")
    _flag(train, "--init-from", default=suppress,
          help="fine-tune: start from this model's weights and tokenizer, a Hugging Face GPT-2 folder "
          "(huggingface-cli download gpt2 --local-dir gpt2) or a gptcore run or checkpoint folder; its shape "
          "is kept and --block-size defaults to its context (smaller crops it) (default: a new model)")
    _flag(train, "--overwrite", action="store_true", default=suppress,
          help="replace a run already saved in --out (without it, a folder holding a run is refused)")
    for flag, kind, help_text in [
        ("max-iters", _positive_int, "optimizer steps in all (on resume: counting the steps already taken)"),
        ("batch-size", _positive_int, "sequences per micro-batch"),
        ("block-size", _positive_int, "context length"), ("n-layer", _positive_int, "transformer blocks"),
        ("n-head", _positive_int, "attention heads"), ("n-embd", _positive_int, "channels"),
        ("lr", _number, "peak learning rate"), ("min-lr", _number, "learning rate at the end of the decay"),
        ("warmup-iters", _nonnegative_int, "linear warmup steps"),
        ("lr-decay-iters", _positive_int, "step where the cosine decay ends (default: --max-iters; on resume, "
         "where the saved run's decay ends)"),
        ("weight-decay", _number, "AdamW weight decay (matrices only)"), ("beta1", _number, "AdamW beta1"),
        ("beta2", _number, "AdamW beta2"), ("grad-clip", _number, "global gradient-norm clip (0: off)"),
        ("dropout", _number, "dropout probability in training: embeddings, attention weights, residual "
         "branches (GPT-2: 0.1; 0: off)"),
        ("grad-accum", _positive_int, "micro-batches per step"),
        ("eval-interval", _positive_int, "steps between evaluations and checkpoints"),
        ("eval-iters", _positive_int, "batches per loss estimate"),
        ("val-fraction", _number, "the last fraction of the tokens held out for validation"),
        ("seed", _nonnegative_int, "random seed"), ("threads", _threads, "threads (default: all cores)"),
        ("log-interval", _positive_int, "steps between metrics.jsonl lines (and progress lines in a log)"),
        ("sample-tokens", _nonnegative_int, "tokens of sample printed at the end"),
        ("keep-checkpoints", _positive_int, "checkpoints kept in --out/checkpoints, the newest ones"),
    ]:
        default = getattr(defaults, flag.replace("-", "_"))
        _flag(train, f"--{flag}", type=kind, default=suppress,
              help=help_text + (f" (default {default})" if default is not None else ""))
    _flag(train, "--no-progress", action="store_true", default=suppress,
          help="no progress bar on a terminal, and no progress lines otherwise")
    _flag(train, "--remeasure-machine", action="store_true", default=suppress,
          help="measure this machine's matmul peak again before the run, instead of reading it from the cache "
          "gptcore machine keeps (MFU is model FLOPs per second over that peak); for a cache measured on a busy "
          "machine (default: measure once per machine, thread count and build)")
    _flag(train, "--no-report", action="store_true", default=suppress,
          help="no report.html in --out (by default it is rewritten at evaluations, as long as drawing "
          "it costs under 5%% of the run's time, and at the end: the run's curves and statistics, and at the end "
          "the model's pictures); a resumed "
          "run keeps the setting")
    train.add_argument("-epochs", type=_number, default=suppress, help="passes over the training tokens, "
                       "instead of --max-iters (see the top of gptcore.cli) (default: unset)")
    train.add_argument("-batch", dest="batch_size", type=_positive_int, default=suppress,
                       help=f"short for --batch-size (default {defaults.batch_size})")
    train.add_argument("-seq", dest="block_size", type=_positive_int, default=suppress,
                       help=f"short for --block-size (default {defaults.block_size})")

    generate = commands.add_parser("generate", help="continue a prompt with a trained model", allow_abbrev=False,
                                   description="Sample text from a checkpoint, printing tokens as they come.")
    _flag(generate, "--model", required=True, help="run folder (gptcore train --out), checkpoint folder, or "
          "Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer files) (required)")
    _flag(generate, "--prompt", default="", help="text to continue (default: a newline, or the vocabulary's "
          "first character if it has no newline)")
    _flag(generate, "--max-new-tokens", type=_nonnegative_int, default=500,
          help="tokens to generate, per sample (default %(default)s)")
    _flag(generate, "--num-samples", type=_positive_int, default=1,
          help="samples to draw, one after the other, each continuing the prompt; with --seed, the same "
          "seed gives the same samples (default %(default)s)")
    _flag(generate, "--temperature", type=_number, default=0.8, help="divide the logits by this before "
          "sampling: below 1 sharper, above 1 flatter, 0 always the most likely token (default %(default)s)")
    _flag(generate, "--top-k", type=_positive_int, default=None,
          help="sample among the k most likely tokens only (default: all)")
    _flag(generate, "--top-p", type=_number, default=None, help="sample among the fewest most likely tokens "
          "whose probabilities add up to p, in (0, 1] (default: off)")
    _flag(generate, "--seed", type=_nonnegative_int, default=None,
          help="random seed: the same seed gives the same text (default: another draw every run)")
    _flag(generate, "--no-kv-cache", action="store_true", help="rerun the whole context for every token "
          "instead of reusing the cached keys and values (slower; for comparison) (default: the cache)")
    _flag(generate, "--threads", type=_threads, default=None,
          help="threads (default: all cores, or OMP_NUM_THREADS)")

    evaluate = commands.add_parser("eval", help="loss, perplexity and bits per character (per byte for BPE) "
                                   "on a text",
                                   allow_abbrev=False,
                                   description="Mean cross-entropy over every complete window of the text.")
    _flag(evaluate, "--model", required=True, help="run folder (gptcore train --out), checkpoint folder, or "
          "Hugging Face GPT-2 folder (required)")
    _flag(evaluate, "--data", required=True, help="a text file, or a folder read recursively (see --glob) "
          "(required)")
    _flag(evaluate, "--glob", default=defaults.glob,
          help="files to read from a --data folder (default %(default)s)")
    _flag(evaluate, "--split", choices=["all", "train", "val"], default="all",
          help="all of the text, or the part gptcore train trains on (train) or validates on (val) "
          "(default %(default)s)")
    _flag(evaluate, "--val-fraction", type=_number, default=defaults.val_fraction,
          help="the last fraction of the tokens that --split val means, as in gptcore train "
          "(default %(default)s)")
    _flag(evaluate, "--threads", type=_threads, default=None,
          help="threads (default: all cores, or OMP_NUM_THREADS)")

    tokenize = commands.add_parser("tokenize", help="show the tokens a text becomes", allow_abbrev=False,
                                   description="Print each token of TEXT: its id and the text it stands for.")
    tokenize.add_argument("text", help="the text to tokenize")
    _flag(tokenize, "--tokenizer", default="gpt2", help="gpt2, a tokenizer folder (a checkpoint's, or "
          "Hugging Face's) or a .tiktoken file (default %(default)s)")
    _flag(tokenize, "--special", action="store_true", help="recognise special tokens such as <|endoftext|> "
          "(default: every character is text)")

    visualize = commands.add_parser("visualize", help="pictures of the model's forward pass and of its training "
                                    "run, in one report page", allow_abbrev=False,
                                    description="Run the prompt through the model once and draw its attention, "
                                    "embeddings and forward, plus the run's curves when --model is a run: PNGs, "
                                    ".npy arrays and one self-contained report.html in --out.")
    _flag(visualize, "--model", required=True, help="run folder (gptcore train --out) or checkpoint folder "
          "(required)")
    _flag(visualize, "--prompt", required=True, help="the text to follow through the model; a longer one than "
          "the context keeps its last block_size tokens (required)")
    _flag(visualize, "--out", default="visualize", help="the folder for the pictures and report.html "
          "(default %(default)s)")
    _flag(visualize, "--threads", type=_threads, default=None,
          help="threads (default: all cores, or OMP_NUM_THREADS)")

    measured = commands.add_parser("machine", help="the matmul peak and memory bandwidth gptcore measured here",
                                   allow_abbrev=False,
                                   description="Print the matmul peak (MFU's yardstick in gptcore train) and the "
                                   "memory read bandwidth (the roofline of gptcore generate) of this machine at "
                                   "this thread count, from the cache, measuring what is not there.")
    _flag(measured, "--remeasure", action="store_true", help="measure both again and replace the cached numbers "
          "(default: the cached ones)")
    _flag(measured, "--threads", type=_threads, default=None,
          help="threads (default: all cores, or OMP_NUM_THREADS)")
    return parser


def _machine(args):
    from gptcore import machine
    from gptcore.kernels import get_num_threads, set_num_threads
    if args.threads:
        set_num_threads(args.threads)
    threads = get_num_threads()
    cached = {quantity: not args.remeasure and machine.is_cached(quantity)
              for quantity in (machine.MATMUL, machine.BANDWIDTH)}
    peak = machine.matmul_peak(remeasure=args.remeasure)
    bandwidth = machine.read_bandwidth(remeasure=args.remeasure)
    def how(quantity):
        return "cached" if cached[quantity] else "measured now"
    print(f"matmul peak: {peak / 1e9:,.1f} GFLOP/s ({how(machine.MATMUL)}; the best of gptcore's matmul_forward "
          f"over {len(machine.peak_shapes())} products on {threads} thread{'s' if threads > 1 else ''})")
    print(f"memory read bandwidth: {bandwidth / 1e9:,.1f} GB/s ({how(machine.BANDWIDTH)}; one pass of "
          f"sum_of_squares over {machine.bandwidth_bytes() / 2**20:g} MB on {threads} thread{'s' if threads > 1 else ''})")
    print(f"cache: {machine.cache_path()} (CPU {machine.cpu_name()})")
    return 0


def _visualize(args):
    from gptcore import visualize
    from gptcore.checkpoint import load_model
    from gptcore.kernels import set_num_threads
    if args.threads:
        set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids, notes = visualize.prompt_tokens(tokenizer, args.prompt, model.config.block_size)
    run = visualize.find_run(args.model)
    if run is None:
        notes.append(f"{args.model} has no {visualize.METRICS} (it is not in a training run): the report shows "
                     f"the model only")
    for note in notes:
        print(note)
    saved = visualize.visualize(model, tokenizer, ids, args.out, run, notes)
    pictures = sorted(name for name in os.listdir(args.out) if name.endswith(".png"))
    print(f"wrote {len(pictures)} pictures, {len(saved)} arrays and {visualize.REPORT} to {args.out}"
          + (f" (with the run {run})" if run else ""))
    return 0


def _train(args):
    from gptcore.train import TrainConfig, init_from_config, resume_config, train
    given = {name: value for name, value in vars(args).items() if name != "command"}
    if "no_progress" in given:
        given["progress"] = not given.pop("no_progress")
    if "no_report" in given:
        given["report"] = not given.pop("no_report")
    epochs = given.pop("epochs", None)
    out = given.pop("out", TrainConfig.out)
    if given.pop("resume", False):
        config = resume_config(out, **given)
    elif given.get("init_from") is not None:
        config = init_from_config(given.pop("init_from"), out=out, **given)
    else:
        config = TrainConfig(out=out, **given)
    if epochs is not None:
        if epochs <= 0:
            raise GptcoreError(f"-epochs must be > 0, got {epochs}")
        if "max_iters" in given:
            raise GptcoreError("pass -epochs or --max-iters, not both")
        config = dataclasses.replace(config, max_iters=_epochs_to_iters(epochs, config))
    result = train(config)
    return 128 + result.signal if result.interrupted else 0


def _epochs_to_iters(epochs, config):
    """-epochs: the steps that take `epochs` passes over the training split's tokens, rounded up."""
    import numpy as np
    from gptcore.data import read_corpus, split_tokens
    if not 0 < config.val_fraction < 1:
        raise GptcoreError(f"--val-fraction must be in (0, 1), got {config.val_fraction}")
    text, _ = read_corpus(config.data, config.glob)
    if config.tokenizer == "char":            # one token per character: no need to build the tokenizer
        n_tokens = len(text)
    else:
        from gptcore.train import make_tokenizer
        n_tokens = len(make_tokenizer(config.tokenizer, text, config.val_fraction).encode(text))
    train_tokens = len(split_tokens(np.zeros(n_tokens, np.int8), config.val_fraction)[0])
    from gptcore.distributed import launched_ranks
    # every rank of `mpiexec -n N` trains on its own batch: N x batch x block x grad_accum tokens a step
    tokens_per_step = launched_ranks() * config.batch_size * config.block_size * config.grad_accum
    return max(1, math.ceil(epochs * train_tokens / tokens_per_step))


def _generate(args):
    import numpy as np
    from gptcore import machine
    from gptcore.checkpoint import load_model
    from gptcore.kernels import set_num_threads
    from gptcore.sample import check_sampling, generate
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if args.threads:
        set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    prompt = args.prompt or tokenizer.default_prompt
    prompt_ids = np.asarray(tokenizer.encode(prompt)).tolist()
    # the yardstick of the last line, before the clock starts (measured once per machine: gptcore.machine)
    bandwidth = machine.read_bandwidth(log=lambda note: print(note, file=sys.stderr))
    # one generator for all the samples: sample 1 is what a run with --num-samples 1 prints, and
    # each next sample continues the same stream of random numbers
    rng = np.random.default_rng(args.seed)
    started, count = time.perf_counter(), 0
    for sample in range(args.num_samples):
        if sample > 0:
            sys.stdout.write(SAMPLE_SEPARATOR)
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        # a BPE token can end inside a character (an emoji is 4 bytes, often 2 or 3 tokens): the
        # incremental decoder holds incomplete bytes back until the character is whole
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              rng, use_kv_cache=not args.no_kv_cache):
            sys.stdout.write(text.decode(tokenizer.token_bytes(token)))
            sys.stdout.flush()
            count += 1
        sys.stdout.write(text.decode(b"", final=True) + "\n")
    seconds = time.perf_counter() - started
    tokens_per_sec = count / max(seconds, 1e-9)
    print(f"{count} tokens in {seconds:.2f} s: {tokens_per_sec:,.0f} tokens/s "
          f"({'no KV cache' if args.no_kv_cache else 'KV cache'})" + _roofline(model, len(prompt_ids), args,
                                                                                tokens_per_sec, bandwidth), file=sys.stderr)
    return 0


def _roofline(model, prompt_length, args, tokens_per_sec, bandwidth):
    """", NN% of the X GB/s memory roofline (R tokens/s at M MB a token)" for generate's last line.
    A token with the KV cache must read every weight once plus the cache's keys and values
    (GPT.generation_bytes_per_token, at the context each token is drawn with: sample.context_lengths);
    reading at the measured bandwidth, R = bandwidth / the mean bytes a token. The measured time
    includes the prompt's own forward and the printing, so the fraction slightly understates the
    steady state. Without the KV cache each token reruns the context: compute-bound, far below the
    same roofline, which shows what the cache gains."""
    from gptcore.sample import context_lengths
    if args.max_new_tokens == 0:
        return ""
    contexts = context_lengths(prompt_length, args.max_new_tokens, model.config.block_size)
    bytes_per_token = sum(model.generation_bytes_per_token(n) for n in contexts) / len(contexts)
    roofline = bandwidth / bytes_per_token
    return (f", {tokens_per_sec / roofline:.0%} of the {bandwidth / 1e9:,.1f} GB/s memory roofline "
            f"({roofline:,.0f} tokens/s at {bytes_per_token / 1e6:,.1f} MB a token)")


def _evaluate(args):
    import numpy as np
    from gptcore.checkpoint import load_model
    from gptcore.data import read_corpus, split_tokens
    from gptcore.kernels import set_num_threads
    from gptcore.train import evaluate
    if args.threads:
        set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    text, report = read_corpus(args.data, args.glob)
    ids = np.asarray(tokenizer.encode(text), np.int64)
    if args.split != "all":
        if not 0 < args.val_fraction < 1:
            raise GptcoreError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
        ids = split_tokens(ids, args.val_fraction)[0 if args.split == "train" else 1]
    nats = evaluate(model, ids)
    if tokenizer.unit == "character":
        bits = f"{nats / math.log(2):.4f} bits per character"
    else:
        # tokens differ in length, so bits per token compare only models with the same tokenizer;
        # bits per byte of the text compare any two. The scored tokens are ids[1 : 1 + windows * T]
        # (gptcore.data.EvalWindows); their bytes are the text they stand for
        T = model.config.block_size
        scored = ids[1:1 + (len(ids) - 1) // T * T]
        bytes_of_id = np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], np.int64)
        n_bytes = int(bytes_of_id[scored].sum())
        bits = f"{nats * len(scored) / math.log(2) / n_bytes:.4f} bits per byte"
    print(f"{args.data} ({args.split}, {len(ids):,} tokens): loss {nats:.4f} nats/token, "
          f"perplexity {math.exp(nats):.3f}, {bits}")
    return 0


def _tokenize(args):
    import numpy as np
    from gptcore.tokenizer import load_tokenizer
    from gptcore.checkpoint import checkpoint_folder
    # a run folder means its current checkpoint's tokenizer
    tokenizer = load_tokenizer(checkpoint_folder(args.tokenizer) if os.path.isdir(args.tokenizer)
                               else args.tokenizer)
    ids = np.asarray(tokenizer.encode(args.text, allowed_special="all" if args.special else ())).tolist()
    width = len(str(tokenizer.vocab_size - 1))
    for token in ids:
        piece = tokenizer.token_bytes(token)
        try:
            shown = repr(piece.decode("utf-8"))
        except UnicodeDecodeError:              # part of a character: show the bytes
            shown = repr(piece)
        print(f"{token:>{width}}  {shown}")
    print(f"{len(args.text):,} characters, {len(args.text.encode('utf-8')):,} bytes -> {len(ids):,} tokens "
          f"(vocabulary {tokenizer.vocab_size:,})", file=sys.stderr)
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    command = {"train": _train, "generate": _generate, "eval": _evaluate, "tokenize": _tokenize,
               "visualize": _visualize, "machine": _machine}[args.command]
    try:
        return command(args)
    except ReportedElsewhere:         # another MPI rank printed the line (gptcore.distributed)
        return EXIT_USAGE
    except GptcoreError as error:
        print(f"gptcore {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # The command is over: a further Ctrl-C (a second press just after the first) must not cut
        # this line short or turn the exit status into a KeyboardInterrupt traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"gptcore {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:           # `gptcore generate ... | head`
        return 0
    except OSError as error:          # a disk that failed where no friendlier message was ready
        where = f"{error.filename}: " if error.filename else ""
        print(f"gptcore {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
