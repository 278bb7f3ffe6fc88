"""Tests for the `gptcore` command (gptcore.cli), and through it gptcore.train and gptcore.sample.

WHAT'S GOING ON HERE
  WHAT   1. end to end: `train` on a small corpus leaves a checkpoint, metrics.jsonl and a loss.png and
            learns something; `generate` prints the prompt and then exactly the asked number of
            characters, the same ones gptcore.sample.generate draws in-process; `eval` prints a loss,
            a perplexity and bits per character that agree with each other and with
            gptcore.train.evaluate;
         2. `--help` on the command and each subcommand;
         3. resuming: N steps, then --resume for N more, ends with the same weights, optimizer moments
            and sampler state, bit for bit, as 2N steps in one run, and logs the same evaluations;
            the README's `--out run1 --resume --max-iters N` continues with the saved data, schedule
            and model, flags typed on resume replace saved settings (and the header names them),
            -epochs counts with the saved batch, and another model shape is refused;
         4. sampling: the same seed gives the same text, other seeds other text; the KV cache gives the
            same tokens as rerunning the whole context, also when the window slides, for a prompt
            longer than the window, and greedily;
         5. bad input: one error line on stderr, exit status 2, no traceback, and the --out folder of an
            earlier run left byte for byte as it was; a new run into a folder holding a run is refused
            unless --overwrite;
         6. Ctrl-C: a checkpoint is saved, the exit status is 130, and the run resumes;
         7. `-epochs -batch -seq`; nanoGPT's `--max_iters` spellings; no flag without a default in
            its help; progress: a bar on a terminal, plain lines in a log, none with --no-progress.
  HOW    Through the real command, `python -m gptcore` in a subprocess with PYTHONPATH at the repository,
         wherever the process boundary matters (exit status, stderr, signals); the oracles (load_model,
         evaluate, generate) run in-process. Every model is tiny (1 layer, 16 channels, block_size 16)
         and trains for a few dozen steps; one module-scoped run serves every test that only reads a
         checkpoint. Subprocesses get OMP_NUM_THREADS=1: the models are too small to gain from threads,
         and other test runs may share the cores.
"""
import argparse
import json
import math
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.numpy import load_file

from gptcore.checkpoint import checkpoint_folder, load_model, save_checkpoint
from gptcore.model import GPT, GPTConfig
from gptcore.sample import generate
from gptcore.train import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--threads", "1", "--sample-tokens", "0", "--no-progress", "--no-report"]
BLOCK_SIZE = 16
CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors",
                    "trainer_state.json", "manifest.json"]
METRICS_KEYS = {"step", "train_loss", "val_loss", "lr", "tokens_per_sec", "mfu", "elapsed"}

# a few Python-like snippets; the corpus is these in a fixed random order
SNIPPETS = [
    "def add(a, b):\n    return a + b\n\n",
    "for i in range(10):\n    print(i * i)\n\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n\n",
    "if x > 0:\n    y = x - 1\nelse:\n    y = 0\n\n",
    "while n:\n    n -= 1\n\n",
]


def python_like_text(n_chars, seed=0):
    rng, parts, size = random.Random(seed), [], 0
    while size < n_chars:
        parts.append(rng.choice(SNIPPETS))
        size += len(parts[-1])
    return "".join(parts)[:n_chars]


def gptcore(*args, cwd, timeout=120):
    """Run `python -m gptcore args...` in `cwd`; -> CompletedProcess with text stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "gptcore", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def snapshot(folder):
    """{file name: bytes} of every file in `folder`: to show that nothing was written, created or deleted."""
    """(Recursive: a run folder holds checkpoints/step-N/...) RUN/.lock is left out: any `train` that
    gets past its flags takes the lock, which creates the file (and writes its pid) and nothing else."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != ".lock"}


def trainer_state(folder):
    """The trainer_state.json of a run folder's current checkpoint (or of a checkpoint folder)."""
    return json.loads((pathlib.Path(checkpoint_folder(folder)) / "trainer_state.json").read_text())


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_clean_error(result, command):
    """Exit status 2, no traceback, and stderr the one line `gptcore <command>: error: ...` (flags
    that argparse rejects too: no usage block). Returns the error line."""
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.splitlines()) == 1, result.stderr
    line = result.stderr.rstrip("\n")
    assert line.startswith(f"gptcore {command}: error: "), result.stderr
    return line


# ----------------------------------------------------------------------------------------------------
# Fixtures: one corpus and one trained checkpoint for every test that only reads them
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "corpus.txt").write_text(python_like_text(20_000))
    return folder


@pytest.fixture(scope="module")
def trained(workdir):
    """150 steps on corpus.txt into `run` (enough that greedy sampling no longer repeats one character);
    -> (the CompletedProcess, the folder)."""
    result = ok(gptcore("train", "--data", "corpus.txt", "--out", "run", *TINY, "--max-iters", 150,
                        "--eval-interval", 50, "--log-interval", 10, "--lr", "1e-2", "--warmup-iters", 5,
                        "--sample-tokens", 30, cwd=workdir))
    return result, workdir / "run"


@pytest.fixture
def checkpoint_copy(trained, tmp_path):
    """A private copy of the trained run's folder, for tests that damage it or point --out at it."""
    return shutil.copytree(trained[1], tmp_path / "run")


# ----------------------------------------------------------------------------------------------------
# 1. End to end
# ----------------------------------------------------------------------------------------------------

def test_train_leaves_checkpoint_metrics_and_a_png_and_logs_only_to_stdout(trained):
    result, run = trained
    current = pathlib.Path(checkpoint_folder(run))
    assert current == run / "checkpoints" / "step-000150"
    assert (run / "latest").read_text() == "checkpoints/step-000150\ncheckpoints/step-000100\n"
    assert sorted(os.listdir(run / "checkpoints")) == ["step-000100", "step-000150"]     # keep 2
    for name in CHECKPOINT_FILES:
        assert (current / name).is_file(), name
    for name in ["metrics.jsonl", "loss.png"]:
        assert (run / name).is_file(), name
    assert trainer_state(run)["step"] == 150
    assert "done: 150 steps" in result.stdout and "sample:" in result.stdout
    assert result.stderr == ""                         # --no-progress: no bar, and no warnings either

    records = metrics(run)
    assert all(METRICS_KEYS <= set(r) for r in records)
    assert [r["step"] for r in records if r["eval"]] == [0, 50, 100, 150]
    assert [r["step"] for r in records if not r["eval"]] == list(range(10, 151, 10))
    assert all(r["tokens_per_sec"] > 0 and math.isfinite(r["train_loss"]) for r in records if not r["eval"])
    assert all(r["elapsed"] >= 0 and r["lr"] > 0 for r in records)


def test_loss_png_is_a_png_image_matplotlib_can_read(trained):
    png = trained[1] / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    height, width, _ = matplotlib.image.imread(png).shape
    assert (width, height) == (700, 400)                 # figsize (7, 4) at 100 dpi


def test_training_lowers_the_validation_loss_from_chance(trained):
    evals = [r for r in metrics(trained[1]) if r["eval"]]
    chance = math.log(load_model(trained[1])[1].vocab_size)
    assert abs(evals[0]["val_loss"] - chance) < 0.1           # an untrained model is near uniform
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0


def test_generate_prints_the_prompt_then_the_new_characters_and_a_rate_on_stderr(trained, workdir):
    result = ok(gptcore("generate", "--model", "run", "--prompt", "def", "--max-new-tokens", 50, "--seed", 1,
                        cwd=workdir))
    assert result.stdout.startswith("def") and result.stdout.endswith("\n")
    assert len(result.stdout) == len("def") + 50 + 1          # one character per token
    assert re.fullmatch(r"50 tokens in [\d.]+ s: [\d,]+ tokens/s \(KV cache\), [\d,]+% of the [\d.,]+ GB/s memory "
                        r"roofline \([\d,]+ tokens/s at [\d.,]+ MB a token\)\n", result.stderr)
    # the oracle: the same draw in-process (default temperature 0.8, no top-k or top-p)
    model, tokenizer = load_model(trained[1])
    expected = tokenizer.decode(list(generate(model, tokenizer.encode("def").tolist(), 50, temperature=0.8,
                                              seed=1)))
    assert result.stdout == "def" + expected + "\n"


EVAL_LINE = re.compile(r"(?P<data>\S+) \((?P<split>\w+), (?P<tokens>[\d,]+) tokens\): loss (?P<nats>[\d.]+) "
                       r"nats/token, perplexity (?P<ppl>[\d.]+), (?P<bits>[\d.]+) bits per character\n")


@pytest.mark.parametrize("split", ["all", "val"])
def test_eval_prints_loss_perplexity_and_bits_that_agree(trained, workdir, split):
    result = ok(gptcore("eval", "--model", "run", "--data", "corpus.txt", "--split", split, cwd=workdir))
    match = EVAL_LINE.fullmatch(result.stdout)
    assert match, result.stdout
    nats, ppl, bits = float(match["nats"]), float(match["ppl"]), float(match["bits"])
    # printed to 4, 3 and 4 decimals: the relations hold to that rounding
    assert bits == pytest.approx(nats / math.log(2), abs=2e-4)
    assert ppl == pytest.approx(math.exp(nats), abs=1e-3 + 1e-4 * math.exp(nats))
    # the oracle: gptcore.train.evaluate in-process on the same tokens (nanoGPT's int(0.9 * n) split)
    model, tokenizer = load_model(trained[1])
    ids = tokenizer.encode((workdir / "corpus.txt").read_text())
    if split == "val":
        ids = ids[int(0.9 * len(ids)):]
    assert int(match["tokens"].replace(",", "")) == len(ids)
    assert nats == pytest.approx(evaluate(model, ids), abs=1e-4)


# ----------------------------------------------------------------------------------------------------
# 2. Help
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["train"], ["generate"], ["eval"]])
def test_help_exits_0_and_prints_usage(tmp_path, command):
    result = ok(gptcore(*command, "--help", cwd=tmp_path))
    assert result.stdout.startswith(f"usage: gptcore {' '.join(command)}".rstrip())
    assert result.stderr == ""


def test_no_subcommand_is_a_usage_error(tmp_path):
    result = gptcore(cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: gptcore")
    assert result.stderr.splitlines()[-1].startswith("gptcore: error: ")


# ----------------------------------------------------------------------------------------------------
# 3. Resuming
# ----------------------------------------------------------------------------------------------------

N = 4           # evaluations every N steps, so the resumed run also re-evaluates the step it resumes at


@pytest.fixture(scope="module", params=[[], ["--dropout", "0.2", "--grad-accum", "2"]],
                ids=["no dropout", "dropout"])
def resumed_runs(workdir, request):
    """-> (whole, resumed): 2N steps in one run; N steps and then --resume for N more. The learning rate
    schedule is the same in both (--lr-decay-iters 2N); so are the thread count and everything else.
    With dropout, the resumed run is given no --dropout: it must keep the saved one, and draw the
    masks the uninterrupted run drew (two micro-batches a step, so each has masks of its own)."""
    name = "dropout" if request.param else "plain"
    common = ["--data", "corpus.txt", *TINY, "--eval-interval", N, "--log-interval", 2, "--warmup-iters", 2,
              "--lr-decay-iters", 2 * N]
    whole, resumed = f"whole-{name}", f"resumed-{name}"
    ok(gptcore("train", *common, *request.param, "--out", whole, "--max-iters", 2 * N, cwd=workdir))
    ok(gptcore("train", *common, *request.param, "--out", resumed, "--max-iters", N, cwd=workdir))
    assert trainer_state(workdir / resumed)["step"] == N
    result = ok(gptcore("train", *common, "--out", resumed, "--max-iters", 2 * N, "--resume", cwd=workdir))
    assert f"resuming at step {N}" in result.stdout
    assert f"dropout {0.2 if request.param else 0:g}" in result.stdout
    return workdir / whole, workdir / resumed


def test_dropout_0_gives_bitwise_the_run_without_dropout_and_dropout_another_one(workdir):
    common = ["--data", "corpus.txt", *TINY, "--max-iters", 3, "--eval-interval", 3]
    runs = {}
    for flags in ([], ["--dropout", "0"], ["--dropout", "0.1"]):
        out = "dropout" + "".join(flags)
        result = ok(gptcore("train", *common, *flags, "--out", out, cwd=workdir))
        assert f"dropout {flags[1] if flags else '0'}" in result.stdout         # the header says it
        assert trainer_state(workdir / out)["config"]["dropout"] == float(flags[1] if flags else 0)
        runs[tuple(flags)] = load_model(workdir / out)[0].flat_params
    assert runs[()].tobytes() == runs[("--dropout", "0")].tobytes()
    assert runs[()].tobytes() != runs[("--dropout", "0.1")].tobytes()


def test_resume_ends_with_bitwise_the_weights_of_one_uninterrupted_run(resumed_runs):
    (whole, _), (resumed, _) = (load_model(folder) for folder in resumed_runs)
    assert whole.params.keys() == resumed.params.keys()
    for name in whole.params:
        assert whole.params[name].tobytes() == resumed.params[name].tobytes(), name


def test_resume_ends_with_the_same_optimizer_moments_and_sampler_state(resumed_runs):
    whole, resumed = resumed_runs
    moments = [load_file(pathlib.Path(checkpoint_folder(folder)) / "optimizer.safetensors")
               for folder in resumed_runs]
    assert moments[0].keys() == moments[1].keys()
    for name in moments[0]:
        assert moments[0][name].tobytes() == moments[1][name].tobytes(), name
    for key in ("step", "sampler", "optimizer_meta"):
        assert trainer_state(whole)[key] == trainer_state(resumed)[key]


def test_resume_logs_the_same_evaluation_losses_as_one_uninterrupted_run(resumed_runs):
    def evaluations(folder):
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in metrics(folder) if r["eval"]]
    whole, resumed = (evaluations(folder) for folder in resumed_runs)
    assert [step for step, _, _ in whole] == [0, N, 2 * N]
    assert resumed == whole


def test_resume_keeps_every_training_line_of_one_uninterrupted_run(resumed_runs):
    def training_lines(folder):
        return [(r["step"], r["train_loss"]) for r in metrics(folder) if not r["eval"]]
    whole, resumed = (training_lines(folder) for folder in resumed_runs)
    assert resumed == whole


def test_resume_logs_the_same_learning_rates_as_one_uninterrupted_run(resumed_runs):
    whole, resumed = ([(r["step"], r["eval"], r["lr"]) for r in metrics(folder)] for folder in resumed_runs)
    assert [line for line in resumed if line[1]] == [line for line in whole if line[1]]


def cosine_lr_of(config, step):
    from gptcore.optim import cosine_lr
    return cosine_lr(step, config["lr"], config["min_lr"], config["warmup_iters"], config["lr_decay_iters"])


@pytest.fixture
def readme_first_run(corpus_file, tmp_path):
    """The README's `gptcore train --data input.txt --out run1`, with tiny settings and its own schedule
    (warmup 2, lr 1e-2): 6 steps, an evaluation every 3, a metrics line every step. -> the run's folder."""
    corpus_file.rename(tmp_path / "input.txt")
    ok(gptcore("train", "--data", "input.txt", "--out", "run1", *TINY, "--max-iters", 6, "--warmup-iters", 2,
               "--lr", "1e-2", "--eval-interval", 3, "--log-interval", 1, cwd=tmp_path))
    return tmp_path / "run1"


def test_readme_resume_example_continues_with_the_first_runs_data_and_schedule(readme_first_run, tmp_path):
    # exactly the README's second command: no --data (the default corpus would be the standard library,
    # whose characters the vocabulary does not cover), no model shape, no schedule
    result = ok(gptcore("train", "--out", "run1", "--resume", "--max-iters", 10, cwd=tmp_path))
    assert "resuming at step 6" in result.stdout
    assert "characters from input.txt" in result.stdout
    assert "resumed with the settings saved in run1, except: max_iters 6 -> 10" in result.stdout
    assert "the learning rate stays at --min-lr 0.0001 after step 6" in result.stdout
    config = trainer_state(readme_first_run)["config"]
    assert (config["data"], config["warmup_iters"], config["lr"], config["lr_decay_iters"]) == \
        ("input.txt", 2, 1e-2, 6)
    assert (config["n_embd"], config["block_size"], config["batch_size"], config["eval_interval"]) == \
        (16, 16, 4, 3)
    # every learning rate of both runs is the first run's schedule: warmup 2, decay ending at step 6
    records = metrics(readme_first_run)
    assert [r["step"] for r in records if r["eval"]] == [0, 3, 6, 9, 10]
    for r in records:
        assert r["lr"] == cosine_lr_of(config, r["step"] if r["eval"] else r["step"] - 1), r
    assert records[-1]["lr"] == 1e-4


def test_resume_flags_replace_saved_settings_and_the_header_names_them(readme_first_run, tmp_path):
    result = ok(gptcore("train", "--out", "run1", "--resume", "--max-iters", 8, "--lr-decay-iters", 8,
                        "--eval-interval", 4, cwd=tmp_path))
    assert ("resumed with the settings saved in run1, except: max_iters 6 -> 8, lr_decay_iters 6 -> 8, "
            "eval_interval 3 -> 4\n") in result.stdout
    config = trainer_state(readme_first_run)["config"]
    assert (config["max_iters"], config["lr_decay_iters"], config["eval_interval"], config["warmup_iters"]) == \
        (8, 8, 4, 2)


def test_epochs_on_resume_counts_with_the_saved_batch_and_block_size(readme_first_run, tmp_path):
    ok(gptcore("train", "--out", "run1", "--resume", "-epochs", 1, cwd=tmp_path))
    train_chars = int(0.9 * len((tmp_path / "input.txt").read_text()))
    assert trainer_state(readme_first_run)["step"] == math.ceil(train_chars / (4 * 16)) == 71


@pytest.mark.parametrize("flags", [["--n-embd", "32"], ["--block-size", "8"], ["-seq", "8"], ["--n-layer", "2"]])
def test_resume_refuses_another_model_shape_and_changes_nothing(readme_first_run, tmp_path, flags):
    before = snapshot(readme_first_run)
    result = gptcore("train", "--out", "run1", "--resume", "--max-iters", 10, *flags, cwd=tmp_path)
    assert "a resumed run keeps its model's shape" in assert_clean_error(result, "train")
    assert result.stdout == ""
    assert snapshot(readme_first_run) == before


# ----------------------------------------------------------------------------------------------------
# 4. Sampling: seeds, and the KV cache
# ----------------------------------------------------------------------------------------------------

def test_same_seed_gives_the_same_text_and_other_seeds_other_text(trained, workdir):
    def sample(seed):
        return ok(gptcore("generate", "--model", "run", "--prompt", "def", "--max-new-tokens", 40,
                          "--seed", seed, cwd=workdir)).stdout
    first = sample(1)
    assert sample(1) == first
    assert len({first, sample(2), sample(3)}) == 3


def test_generate_without_kv_cache_prints_the_same_text_past_the_window(trained, workdir):
    args = ["generate", "--model", "run", "--prompt", "for", "--max-new-tokens", 3 * BLOCK_SIZE, "--seed", 7]
    cached = ok(gptcore(*args, cwd=workdir))
    uncached = ok(gptcore(*args, "--no-kv-cache", cwd=workdir))
    assert uncached.stdout == cached.stdout
    assert len(cached.stdout) == len("for") + 3 * BLOCK_SIZE + 1
    assert "(no KV cache)" in uncached.stderr and "(KV cache)" in cached.stderr


@pytest.fixture(scope="module")
def models(trained):
    """The trained model, and a random one with every parameter scaled by 4: its distributions are sharp
    and change with the context, so greedy sampling from it does not settle on one character."""
    model, tokenizer = load_model(trained[1])
    sharp = GPT(model.config, seed=3)
    for value in sharp.params.values():
        value *= 4
    return {"trained": model, "random x4": sharp}, tokenizer


@pytest.mark.parametrize("which", ["trained", "random x4"])
@pytest.mark.parametrize("prompt_length, new_tokens, temperature, seed", [
    (3, 10, 1.0, 0),                                  # stays inside the window
    (3, 3 * BLOCK_SIZE, 1.0, 0),                      # the window fills and slides several times
    (3, 3 * BLOCK_SIZE, 1.0, 1),
    (3, 3 * BLOCK_SIZE, 1.0, 2),
    (2 * BLOCK_SIZE + 5, 2 * BLOCK_SIZE, 1.0, 3),     # the prompt alone is longer than the window
    (BLOCK_SIZE, 2 * BLOCK_SIZE, 1.0, 4),             # the prompt exactly fills the window
    (3, 3 * BLOCK_SIZE, 0.0, None),                   # greedy
    (2 * BLOCK_SIZE + 5, 2 * BLOCK_SIZE, 0.0, None),
])
def test_kv_cache_generates_the_same_tokens_as_rerunning_the_context(models, which, prompt_length,
                                                                     new_tokens, temperature, seed):
    model, tokenizer = models[0][which], models[1]
    prompt = tokenizer.encode(python_like_text(prompt_length, seed=5)).tolist()
    cached = list(generate(model, prompt, new_tokens, temperature=temperature, seed=seed, use_kv_cache=True))
    rerun = list(generate(model, prompt, new_tokens, temperature=temperature, seed=seed, use_kv_cache=False))
    assert len(cached) == new_tokens
    assert all(0 <= t < tokenizer.vocab_size for t in cached)
    if which == "random x4":                # the trained model may settle on spaces; this one must not
        assert len(set(cached)) > 3
    assert cached == rerun


@pytest.mark.parametrize("which", ["trained", "random x4"])
def test_kv_cache_generates_the_same_tokens_with_top_k_and_top_p(models, which):
    model, tokenizer = models[0][which], models[1]
    prompt = tokenizer.encode("def").tolist()
    for kwargs in ({"top_k": 3}, {"top_p": 0.5}, {"top_k": 5, "top_p": 0.9}):
        runs = [list(generate(model, prompt, 3 * BLOCK_SIZE, temperature=0.9, seed=11, use_kv_cache=cache,
                              **kwargs)) for cache in (True, False)]
        assert runs[0] == runs[1], kwargs


# ----------------------------------------------------------------------------------------------------
# 5. Bad input: one line, exit 2, nothing overwritten
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def corpus_file(tmp_path):
    """corpus.txt in the test's own folder: 5,000 characters of the same kind as the trained run's."""
    path = tmp_path / "corpus.txt"
    path.write_text(python_like_text(5_000))
    return path


def _missing_path(folder):
    return "no_such_file.txt"


def _empty_file(folder):
    (folder / "empty.txt").write_text("")
    return "empty.txt"


def _shorter_than_one_window(folder):
    (folder / "short.txt").write_text("def f(): pass\n")        # 14 characters; a window needs 17
    return "short.txt"


def _folder_without_matching_files(folder):
    (folder / "texts").mkdir()
    (folder / "texts" / "notes.txt").write_text(python_like_text(5_000))   # the default glob is *.py
    return "texts"


def _binary_file(folder):
    (folder / "data.bin").write_bytes(bytes(range(256)) * 40)
    return "data.bin"


BAD_CORPORA = [   # (make the --data argument inside a folder, words in train's error, words in eval's)
    pytest.param(_missing_path, "does not exist", "does not exist", id="missing path"),
    pytest.param(_empty_file, "is empty", "is empty", id="empty file"),
    pytest.param(_shorter_than_one_window, "fewer than one window", "shorter than one window",
                 id="shorter than one window"),
    pytest.param(_folder_without_matching_files, "no files matching '*.py'", "no files matching '*.py'",
                 id="folder without matching files"),
    pytest.param(_binary_file, "binary", "binary", id="binary file"),
]


@pytest.mark.parametrize("make, train_words, eval_words", BAD_CORPORA)
def test_bad_corpus_is_one_error_line_from_train_and_eval_and_leaves_the_out_folder_untouched(
        checkpoint_copy, tmp_path, make, train_words, eval_words):
    data = make(tmp_path)
    before = snapshot(checkpoint_copy)
    result = gptcore("train", "--data", data, "--out", "run", "--overwrite", *TINY, "--max-iters", 5,
                     cwd=tmp_path)
    assert train_words in assert_clean_error(result, "train")
    assert result.stdout == ""
    assert snapshot(checkpoint_copy) == before
    result = gptcore("eval", "--model", "run", "--data", data, cwd=tmp_path)
    assert eval_words in assert_clean_error(result, "eval")
    assert result.stdout == ""


def test_training_into_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(checkpoint_copy,
                                                                                     corpus_file, tmp_path):
    before = snapshot(checkpoint_copy)
    result = gptcore("train", "--data", "corpus.txt", "--out", "run", *TINY, "--max-iters", 3, cwd=tmp_path)
    assert assert_clean_error(result, "train") == ("gptcore train: error: run/ already holds a training run: "
                                                   "pass --resume to continue it or --overwrite to replace it")
    assert result.stdout == ""
    assert snapshot(checkpoint_copy) == before
    ok(gptcore("train", "--data", "corpus.txt", "--out", "run", "--overwrite", *TINY, "--max-iters", 3,
               cwd=tmp_path))
    assert trainer_state(checkpoint_copy)["step"] == 3
    assert [r["step"] for r in metrics(checkpoint_copy) if r["eval"]] == [0, 3]      # the old run's are gone


def test_resuming_on_text_with_characters_outside_the_vocabulary_changes_nothing(checkpoint_copy, tmp_path):
    (tmp_path / "upper.txt").write_text(python_like_text(5_000).upper())
    before = snapshot(checkpoint_copy)
    result = gptcore("train", "--data", "upper.txt", "--out", "run", "--resume", *TINY, "--max-iters", 50,
                     cwd=tmp_path)
    assert "not in the tokenizer's vocabulary" in assert_clean_error(result, "train")
    assert snapshot(checkpoint_copy) == before


@pytest.mark.parametrize("flags, words", [
    (["--n-layer", "0"], "--n-layer"),               # argparse rejects the value
    (["--batch-size", "-1"], "--batch-size"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--beta2", "1"], "--beta2"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
    (["--dropout", "x"], "--dropout"),
    (["--val-fraction", "0"], "--val-fraction"),
    (["-epochs", "0"], "-epochs"),
    (["-epochs", "1", "--max-iters", "9"], "-epochs or --max-iters"),
    (["--max-iter", "9"], "did you mean --max-iters?"),   # no prefix matching
    (["--overwrite", "--resume"], "not both"),
])
def test_impossible_train_flags_are_one_error_line_and_leave_the_out_folder_untouched(
        checkpoint_copy, corpus_file, tmp_path, flags, words):
    before = snapshot(checkpoint_copy)
    result = gptcore("train", "--data", "corpus.txt", "--out", "run", *TINY, "--max-iters", 5, *flags,
                     cwd=tmp_path)
    assert words in assert_clean_error(result, "train")
    assert result.stdout == ""
    assert snapshot(checkpoint_copy) == before


@pytest.mark.parametrize("flags, words", [
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--prompt", "déf"], "not in the tokenizer's vocabulary"),
    (["--temp", "0.5"], "unknown flag --temp (did you mean --temperature?)"),
])
def test_impossible_generate_flags_are_one_error_line_and_print_nothing(trained, workdir, flags, words):
    result = gptcore("generate", "--model", "run", "--max-new-tokens", 5, *flags, cwd=workdir)
    assert words in assert_clean_error(result, "generate")
    assert result.stdout == ""


def test_eval_of_a_split_with_an_impossible_val_fraction_is_one_error_line(trained, workdir):
    result = gptcore("eval", "--model", "run", "--data", "corpus.txt", "--split", "val", "--val-fraction", 0,
                     cwd=workdir)
    assert "--val-fraction" in assert_clean_error(result, "eval")


# Each damage is done to the run's current checkpoint (RUN/latest names it).
def _delete_tokenizer(run):
    (pathlib.Path(checkpoint_folder(run)) / "tokenizer.json").unlink()


def _truncate_model(run):
    path = pathlib.Path(checkpoint_folder(run)) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _model_of_another_config(run, unsigned=False):
    """model.safetensors of a model with n_embd 8 instead of 16, over the real one (and, unsigned, the
    manifest deleted, as in a folder from an older gptcore: then the shape check tells)."""
    folder = pathlib.Path(checkpoint_folder(run))
    model, tokenizer = load_model(folder)
    other = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK_SIZE, n_layer=1, n_head=2,
                          n_embd=8), seed=0)
    save_checkpoint(run.parent / "other", other, tokenizer)
    shutil.copy(run.parent / "other" / "model.safetensors", folder / "model.safetensors")
    if unsigned:
        (folder / "manifest.json").unlink()


def _config_vocab_disagrees_with_tokenizer(run):
    path = pathlib.Path(checkpoint_folder(run)) / "config.json"
    config = json.loads(path.read_text())
    config["vocab_size"] += 1
    path.write_text(json.dumps(config))


def _flip_a_bit_in_the_weights(run):
    """One bit in the tensor data: safetensors cannot see it, the manifest's sha256 does."""
    path = pathlib.Path(checkpoint_folder(run)) / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10
    path.write_bytes(bytes(raw))


def _damaged_pointer(run):
    (run / "latest").write_text("../../etc\n")


DAMAGES = [
    pytest.param(_delete_tokenizer, "has no tokenizer.json", id="no tokenizer.json"),
    pytest.param(_truncate_model, "model.safetensors is ", id="truncated model.safetensors"),
    pytest.param(_model_of_another_config, "bytes but manifest.json says", id="another model.safetensors"),
    pytest.param(lambda run: _model_of_another_config(run, unsigned=True), "has shape",
                 id="tensor of the wrong shape, no manifest"),
    pytest.param(_config_vocab_disagrees_with_tokenizer, "inconsistent", id="vocab sizes disagree"),
    pytest.param(_flip_a_bit_in_the_weights, "does not match its sha256", id="a flipped bit in the weights"),
    pytest.param(_damaged_pointer, "latest is damaged", id="latest names no checkpoint"),
]
COMMANDS_READING_A_CHECKPOINT = {
    "generate": ["generate", "--model", "run", "--prompt", "def", "--max-new-tokens", 5],
    "eval": ["eval", "--model", "run", "--data", "corpus.txt"],
    "train --resume": ["train", "--data", "corpus.txt", "--out", "run", "--resume", *TINY, "--max-iters", 50],
}


@pytest.mark.parametrize("command", COMMANDS_READING_A_CHECKPOINT)
@pytest.mark.parametrize("damage, words", DAMAGES)
def test_damaged_checkpoint_is_one_error_line_and_stays_as_it_was(checkpoint_copy, corpus_file, tmp_path,
                                                                  damage, words, command):
    damage(checkpoint_copy)
    before = snapshot(checkpoint_copy)
    args = COMMANDS_READING_A_CHECKPOINT[command]
    result = gptcore(*args, cwd=tmp_path)
    assert words in assert_clean_error(result, args[0])
    assert result.stdout == ""
    assert snapshot(checkpoint_copy) == before


def test_out_naming_an_existing_file_is_one_error_line_and_leaves_the_file_untouched(corpus_file, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me\n")
    result = gptcore("train", "--data", "corpus.txt", "--out", "notes.txt", *TINY, "--max-iters", 5,
                     cwd=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"
    assert "notes.txt" in assert_clean_error(result, "train")


# ----------------------------------------------------------------------------------------------------
# 6. Ctrl-C
# ----------------------------------------------------------------------------------------------------

def test_ctrl_c_saves_a_checkpoint_exits_130_and_the_run_resumes(corpus_file, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "gptcore", "train", "--data", "corpus.txt", "--out", "run",
                                *TINY, "--max-iters", "1000000", "--eval-interval", "1000000",
                                "--log-interval", "5"],
                               cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait for the step-0 evaluation line and one training line: the loop is running
        deadline = time.monotonic() + 60
        while not ((run / "metrics.jsonl").exists() and len(metrics(run)) >= 2):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no training line within 60 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    saved = re.search(r"^interrupted by SIGINT at step (\d+): checkpoint saved to run/checkpoints/step-0*\1; "
                      r"continue with --resume --out run$", stdout, re.MULTILINE)
    assert saved, stdout
    step = int(saved[1])
    assert 5 <= step < 1_000_000
    assert trainer_state(run)["step"] == step
    load_model(run)                                       # the checkpoint loads

    result = ok(gptcore("train", "--data", "corpus.txt", "--out", "run", "--resume", *TINY,
                        "--max-iters", step + 3, "--eval-interval", 1_000_000, cwd=tmp_path))
    assert f"resuming at step {step}" in result.stdout
    assert trainer_state(run)["step"] == step + 3
    assert metrics(run)[-1]["step"] == step + 3 and metrics(run)[-1]["eval"]


# ----------------------------------------------------------------------------------------------------
# 7. -epochs -batch -seq; flag spellings; the progress bar
# ----------------------------------------------------------------------------------------------------

def test_epochs_batch_seq_flags_train_ceil_epochs_times_windows_steps(corpus_file, tmp_path):
    result = ok(gptcore("train", "--data", "corpus.txt", "--out", "run", "-epochs", 1, "-batch", 4, "-seq", 16,
                        "--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--eval-interval", 1_000_000,
                        "--eval-iters", 1, "--threads", 1, "--sample-tokens", 0, "--no-progress", cwd=tmp_path))
    train_chars = int(0.9 * len(corpus_file.read_text()))          # 4,500 of the 5,000
    steps = math.ceil(1 * train_chars / (4 * 16))
    assert trainer_state(tmp_path / "run")["step"] == steps == 71
    assert f"training: {steps} steps of 4 x 16 tokens" in result.stdout
    assert trainer_state(tmp_path / "run")["config"]["batch_size"] == 4
    assert json.loads((pathlib.Path(checkpoint_folder(tmp_path / "run")) / "config.json").read_text())[
        "n_positions"] == 16


def test_nanogpt_underscore_spellings_are_hidden_aliases_of_the_dashed_flags(corpus_file, tmp_path):
    ok(gptcore("train", "--data", "corpus.txt", "--out", "run", *TINY, "--max_iters=3", "--eval_interval", 2,
               "--warmup_iters=0", cwd=tmp_path))
    config = trainer_state(tmp_path / "run")["config"]
    assert (config["max_iters"], config["eval_interval"], config["warmup_iters"]) == (3, 2, 0)
    assert [r["step"] for r in metrics(tmp_path / "run") if r["eval"]] == [0, 2, 3]
    assert "_iters" not in ok(gptcore("train", "--help", cwd=tmp_path)).stdout


@pytest.mark.parametrize("command", ["train", "generate", "eval"])
def test_every_flag_has_a_help_line_and_every_value_its_default(command):
    from gptcore import cli
    parser = cli._parser()
    subcommand = next(action.choices for action in parser._actions if isinstance(action.choices, dict))[command]
    flags = [action for action in subcommand._actions if action.help != argparse.SUPPRESS
             and action.dest != "help"]
    assert flags
    for action in flags:
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        if action.nargs != 0:                             # a flag with a value, not a switch
            words = action.help % {"default": action.default}
            assert "default" in words or "required" in words, f"{command} {action.option_strings[0]}: {words!r}"


def tiny_without(flag):
    return [f for f in TINY if f != flag]


def test_without_a_terminal_progress_is_plain_lines_on_stdout_not_a_bar(corpus_file, tmp_path):
    result = ok(gptcore("train", "--data", "corpus.txt", "--out", "run", *tiny_without("--no-progress"),
                        "--max-iters", 6, "--log-interval", 2, "--eval-interval", 1_000_000, cwd=tmp_path))
    assert "\r" not in result.stdout + result.stderr and result.stderr == ""       # no bar
    progress = re.findall(r"^step (\d+)/6: loss [\d.]+, lr [\d.e+-]+, [\d,]+ tokens/s, MFU [\d,]+%$", result.stdout,
                          re.MULTILINE)
    assert progress == ["2", "4", "6"]
    assert "done: 6 steps" in result.stdout
    # TINY keeps --warmup-iters at its default of 100: longer than the run, which the header says
    assert "warning: --max-iters 6 ends before the warmup of 100 steps" in result.stdout


def test_no_progress_prints_no_progress_lines(corpus_file, tmp_path):
    result = ok(gptcore("train", "--data", "corpus.txt", "--out", "run", *TINY, "--max-iters", 4,
                        "--log-interval", 2, "--eval-interval", 1_000_000, cwd=tmp_path))
    assert not re.search(r"^step \d+/4", result.stdout, re.MULTILINE)
    assert len(metrics(tmp_path / "run")) == 4                       # metrics.jsonl still has its lines


def test_on_a_terminal_progress_is_a_bar_on_stderr(corpus_file, tmp_path):
    import fcntl
    import pty
    import struct
    import termios
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        result = subprocess.run([sys.executable, "-m", "gptcore", "train", "--data", "corpus.txt", "--out", "run",
                                 *tiny_without("--no-progress"), "--max-iters", "6", "--eval-interval", "1000000"],
                                cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=terminal, text=True,
                                timeout=120)
    finally:
        os.close(terminal)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:             # EIO: everything the process wrote has been read
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    assert result.returncode == 0, drawn
    drawn = drawn.decode("utf-8", "replace")
    assert re.search(r"\d/6 \[", drawn) and "step/s" in drawn                     # tqdm's "3/6 [00:00<..."
    assert "step/s" not in result.stdout and not re.search(r"^step \d+/6", result.stdout, re.MULTILINE)
    assert "done: 6 steps" in result.stdout
