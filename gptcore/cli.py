"""gptcore.cli: the `gptcore` command (also `python -m gptcore`): train, generate, eval.

WHAT'S GOING ON HERE
====================
  gptcore train      [--data PATH] [--out DIR] [nanoGPT's flags...]   train a model (train.py)
  gptcore generate   --model DIR --prompt TEXT [sampling flags]       continue a prompt (sample.py)
  gptcore eval       --model DIR --data PATH                          loss, perplexity, bits/char

Each subcommand parses its flags into the same function a Python user would call. Errors a user can
cause (a missing file, a flag value that means nothing, a damaged checkpoint) arrive here as
GptcoreError and leave as one line on stderr and exit status 2, never a traceback; Ctrl-C exits 130.
The seed project's `-epochs -batch -seq` spellings are accepted by `train`: epochs become iterations
(epochs * training tokens / (batch * seq * grad_accum)).
"""
import argparse
import math
import sys
import time

from gptcore.errors import GptcoreError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _integer_at_least(minimum):
    """An argparse type: an integer >= minimum."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


_positive_int = _integer_at_least(1)
_nonnegative_int = _integer_at_least(0)


def _number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _parser():
    from gptcore.train import TrainConfig
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="gptcore", description="A GPT-2 written from scratch: train it, "
                                     "sample from it, evaluate it.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,generate,eval}")

    train = commands.add_parser("train", help="train a character-level GPT",
                                description="Train a character-level GPT-2 (defaults: nanoGPT's CPU baby GPT). "
                                "Without --data it trains on this Python's standard library source.")
    train.add_argument("--data", help="a text file, or a folder read recursively (see --glob); "
                       "default: the Python standard library")
    train.add_argument("--glob", default=defaults.glob, help="files to read from a --data folder (default %(default)s)")
    train.add_argument("--out", default=defaults.out, help="checkpoint folder (default %(default)s)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out (the model "
                       "and its vocabulary come from the checkpoint; --n-layer etc. are then ignored)")
    for flag, kind, help_text in [
        ("max-iters", _positive_int, "optimizer steps"), ("batch-size", _positive_int, "sequences per micro-batch"),
        ("block-size", _positive_int, "context length"), ("n-layer", _positive_int, "transformer blocks"),
        ("n-head", _positive_int, "attention heads"), ("n-embd", _positive_int, "channels"),
        ("lr", _number, "peak learning rate"), ("min-lr", _number, "learning rate at the end of the decay"),
        ("warmup-iters", _nonnegative_int, "linear warmup steps"),
        ("lr-decay-iters", _positive_int, "step where the cosine decay ends (default: --max-iters)"),
        ("weight-decay", _number, "AdamW weight decay (matrices only)"), ("beta1", _number, "AdamW beta1"),
        ("beta2", _number, "AdamW beta2"), ("grad-clip", _number, "global gradient-norm clip (0: off)"),
        ("grad-accum", _positive_int, "micro-batches per step"),
        ("eval-interval", _positive_int, "steps between evaluations and checkpoints"),
        ("eval-iters", _positive_int, "batches per loss estimate"),
        ("val-fraction", _number, "the last fraction of the tokens held out for validation"),
        ("seed", _nonnegative_int, "random seed"), ("threads", _positive_int, "threads (default: all cores)"),
        ("log-interval", _positive_int, "steps between metrics.jsonl lines"),
        ("sample-tokens", _nonnegative_int, "characters of sample printed at the end"),
    ]:
        name = flag.replace("-", "_")
        default = getattr(defaults, name)
        train.add_argument(f"--{flag}", type=kind, default=default,
                           help=help_text + (f" (default {default})" if default is not None else ""))
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    # the seed project's spellings
    train.add_argument("-epochs", type=_number, help="passes over the training tokens (sets --max-iters)")
    train.add_argument("-batch", type=_positive_int, help="the seed's name for --batch-size")
    train.add_argument("-seq", type=_positive_int, help="the seed's name for --block-size")

    generate = commands.add_parser("generate", help="continue a prompt with a trained model",
                                   description="Sample text from a checkpoint, printing tokens as they come.")
    generate.add_argument("--model", required=True, help="checkpoint folder (gptcore train --out)")
    generate.add_argument("--prompt", default="", help="text to continue (default: start of a line)")
    generate.add_argument("--max-new-tokens", type=_nonnegative_int, default=500)
    generate.add_argument("--temperature", type=_number, default=0.8, help="0 = always the most likely token")
    generate.add_argument("--top-k", type=_positive_int, default=None)
    generate.add_argument("--top-p", type=_number, default=None, help="nucleus sampling, in (0, 1]")
    generate.add_argument("--seed", type=_nonnegative_int, default=None, help="same seed, same text")
    generate.add_argument("--no-kv-cache", action="store_true", help="rerun the whole context for every token")
    generate.add_argument("--threads", type=_positive_int, default=None)

    evaluate = commands.add_parser("eval", help="loss, perplexity and bits per character on a text",
                                   description="Mean cross-entropy over every complete window of the text.")
    evaluate.add_argument("--model", required=True, help="checkpoint folder")
    evaluate.add_argument("--data", required=True, help="a text file, or a folder (see --glob)")
    evaluate.add_argument("--glob", default="*.py")
    evaluate.add_argument("--split", choices=["all", "train", "val"], default="all",
                          help="all of the text, or the part `gptcore train` trains / validates on")
    evaluate.add_argument("--val-fraction", type=_number, default=0.1)
    evaluate.add_argument("--threads", type=_positive_int, default=None)
    return parser


def _train(args):
    import numpy as np
    from gptcore.train import TrainConfig, train
    from gptcore.data import read_corpus, split_tokens
    if args.batch is not None:
        args.batch_size = args.batch
    if args.seq is not None:
        args.block_size = args.seq
    if args.epochs is not None:
        if args.epochs <= 0:
            raise GptcoreError(f"-epochs must be > 0, got {args.epochs}")
        text, _ = read_corpus(args.data, args.glob)
        train_chars = len(split_tokens(np.zeros(len(text), np.int8), args.val_fraction)[0])
        tokens_per_step = args.batch_size * args.block_size * args.grad_accum
        args.max_iters = max(1, math.ceil(args.epochs * train_chars / tokens_per_step))
    fields = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    config.progress = not args.no_progress
    result = train(config)
    return EXIT_INTERRUPTED if result.interrupted else 0


def _generate(args):
    from gptcore.checkpoint import load_model
    from gptcore.kernels import set_num_threads
    from gptcore.sample import check_sampling, generate
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if args.threads:
        set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    prompt = args.prompt or ("\n" if "\n" in tokenizer.chars else tokenizer.chars[0])
    prompt_ids = tokenizer.encode(prompt).tolist()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    started, count = time.perf_counter(), 0
    for token in generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          args.seed, use_kv_cache=not args.no_kv_cache):
        sys.stdout.write(tokenizer.decode([token]))
        sys.stdout.flush()
        count += 1
    seconds = time.perf_counter() - started
    sys.stdout.write("\n")
    print(f"{count} tokens in {seconds:.2f} s: {count / max(seconds, 1e-9):,.0f} tokens/s "
          f"({'no KV cache' if args.no_kv_cache else 'KV cache'})", file=sys.stderr)
    return 0


def _evaluate(args):
    from gptcore.checkpoint import load_model
    from gptcore.data import read_corpus, split_tokens
    from gptcore.kernels import set_num_threads
    from gptcore.train import evaluate
    if args.threads:
        set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    text, report = read_corpus(args.data, args.glob)
    ids = tokenizer.encode(text)
    if args.split != "all":
        if not 0 < args.val_fraction < 1:
            raise GptcoreError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
        ids = split_tokens(ids, args.val_fraction)[0 if args.split == "train" else 1]
    nats = evaluate(model, ids)
    print(f"{args.data} ({args.split}, {len(ids):,} tokens): loss {nats:.4f} nats/token, "
          f"perplexity {math.exp(nats):.3f}, {nats / math.log(2):.4f} bits per character")
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    command = {"train": _train, "generate": _generate, "eval": _evaluate}[args.command]
    try:
        return command(args)
    except GptcoreError as error:
        print(f"gptcore {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"gptcore {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:           # `gptcore generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
