"""GPT-2 generation, gptcore side by side with Hugging Face transformers: tokens per second, same tokens.

WHAT'S GOING ON HERE
  Both sides load one Hugging Face GPT-2 folder (--model DIR, e.g. the one `huggingface-cli download
  gpt2` leaves; without it, a GPT-2 124M with random weights that transformers builds and saves into
  a temporary folder) and decode greedily, with their KV caches, from the same prompt:
    gptcore        gptcore.checkpoint.load_model, then gptcore.sample.generate(temperature=0);
    transformers   GPT2LMHeadModel.from_pretrained, then generate(do_sample=False).
  The two alternate, --repeats times each, in one process and on the same threads; the script checks
  that both produced the same tokens and prints each side's median tokens/s and the ratio of their
  median times. Absolute speed depends on the machine; the ratio measured side by side is the number
  to compare.

Run it:  flock /tmp/bench.lock python3 bench/generate_vs_transformers.py
         flock /tmp/bench.lock python3 bench/generate_vs_transformers.py --model gpt2 --new-tokens 200
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from gptcore import get_num_threads  # noqa: E402
from gptcore.checkpoint import load_model  # noqa: E402
from gptcore.sample import generate  # noqa: E402
from gptcore.tokenizer import GPT2_FOLDER  # noqa: E402


def random_gpt2_124m(folder):
    """GPT-2 124M's shapes with transformers' random initialisation, saved as from_pretrained reads it,
    with GPT-2's tokenizer files."""
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(GPT2_FOLDER, name), folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a Hugging Face GPT-2 folder (default: a random 124M)")
    parser.add_argument("--prompt", default="The meaning of life is")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.model
        if folder is None:
            folder = os.path.join(temporary, "gpt2-124m-random")
            random_gpt2_124m(folder)
        ours, tokenizer = load_model(folder)
        theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    torch.set_num_threads(get_num_threads())
    prompt = list(np.asarray(tokenizer.encode(args.prompt)).tolist())
    ours_seconds, theirs_seconds = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        ours_tokens = list(generate(ours, prompt, args.new_tokens, temperature=0))
        ours_seconds.append(time.perf_counter() - started)
        with torch.no_grad():
            started = time.perf_counter()
            output = theirs.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)
            theirs_seconds.append(time.perf_counter() - started)
        theirs_tokens = output[0, len(prompt):].tolist()
        if ours_tokens != theirs_tokens:
            first = next(i for i, (a, b) in enumerate(zip(ours_tokens, theirs_tokens)) if a != b)
            raise SystemExit(f"the greedy tokens differ at new token {first}")
    ours_time, theirs_time = statistics.median(ours_seconds), statistics.median(theirs_seconds)
    print(f"{ours.num_parameters:,} parameters, {args.new_tokens} new tokens after {len(prompt)}, greedy, "
          f"{get_num_threads()} threads, medians of {args.repeats}; the same tokens on both sides")
    print(f"gptcore       {args.new_tokens / ours_time:8.1f} tokens/s")
    print(f"transformers  {args.new_tokens / theirs_time:8.1f} tokens/s")
    print(f"gptcore time / transformers time: {ours_time / theirs_time:.2f}")


if __name__ == "__main__":
    main()
