"""BPE through the command line: `gptcore train --tokenizer`, generate, eval (bits per byte), tokenize.

WHAT'S GOING ON HERE
  WHAT   1. `train --tokenizer bpe:N` trains N tokens on the training text and saves them with the
            checkpoint as Hugging Face's tokenizer.json (which `tokenizers` reads to the same ids);
            the header says tokens, not characters;
         2. `eval` on a BPE checkpoint reports bits per byte, and the number agrees with the loss;
         3. `generate` prints whole characters: its output is the decode of the sampled tokens;
         4. `tokenize` prints each token's id and text;
         5. `--tokenizer gpt2` and a tokenizer folder train; a resumed run keeps its tokenizer;
         6. char checkpoints are unchanged: the vocabulary hash they record is the old formula.
  HOW    `python -m gptcore` in a subprocess (PYTHONPATH at this checkout), tiny models, a few steps.
"""
import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gptcore.checkpoint import checkpoint_folder, load_model
from gptcore.sample import generate
from gptcore.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
from gptcore.train import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--threads", "1", "--sample-tokens", "0", "--no-progress", "--no-report"]
TEXT = ("First Citizen: before we proceed any further, hear me speak. Ay, señor, ¿qué? naïve café 😀 — "
        "we'll say it's 1234 o'clock.\n\n") * 60


def gptcore(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gptcore", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe-cli")
    (folder / "corpus.txt").write_text(TEXT, encoding="utf-8")
    result = ok(gptcore("train", "--data", "corpus.txt", "--out", "run", "--tokenizer", "bpe:300",
                        "--max-iters", "6", "--eval-interval", "3", *TINY, cwd=folder))
    return folder, result


def test_train_with_bpe_saves_the_tokenizer_it_trained_on_the_training_text(bpe_run):
    folder, result = bpe_run
    model, tokenizer = load_model(folder / "run")
    assert isinstance(tokenizer, BPETokenizer) and tokenizer.vocab_size == model.config.vocab_size == 300
    train_text = TEXT[:int(len(TEXT) * 0.9)]
    assert tokenizer == BPETokenizer.train(train_text, 300)
    assert "vocabulary 300 tokens (bpe:300)" in result.stdout
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(os.path.join(checkpoint_folder(folder / "run"), "tokenizer.json"))
    assert hf.encode(TEXT[:500]).ids == tokenizer.encode(TEXT[:500])


def test_eval_of_a_bpe_model_reports_bits_per_byte_that_agree_with_the_loss(bpe_run):
    folder, _ = bpe_run
    result = ok(gptcore("eval", "--model", "run", "--data", "corpus.txt", cwd=folder))
    model, tokenizer = load_model(folder / "run")
    ids = np.asarray(tokenizer.encode(TEXT), np.int64)
    nats = evaluate(model, ids)
    T = model.config.block_size
    scored = ids[1:1 + (len(ids) - 1) // T * T]
    n_bytes = len(tokenizer.decode(scored.tolist()).encode("utf-8"))
    assert f"loss {nats:.4f} nats/token" in result.stdout
    assert f"{nats * len(scored) / math.log(2) / n_bytes:.4f} bits per byte" in result.stdout
    assert "per character" not in result.stdout


def test_generate_from_a_bpe_model_prints_whole_characters(bpe_run):
    folder, _ = bpe_run
    result = ok(gptcore("generate", "--model", "run", "--prompt", "café", "--max-new-tokens", "40",
                        "--seed", "3", "--temperature", "1.5", cwd=folder))
    model, tokenizer = load_model(folder / "run")
    tokens = list(generate(model, tokenizer.encode("café"), 40, temperature=1.5, top_k=None, seed=3))
    assert result.stdout == "café" + tokenizer.decode(tokens) + "\n"


def test_tokenize_prints_each_token_with_its_id(tmp_path):
    result = ok(gptcore("tokenize", "Hello world's 😀", cwd=tmp_path))
    gpt2 = load_tokenizer("gpt2")
    ids = gpt2.encode("Hello world's 😀")
    lines = result.stdout.splitlines()
    assert [int(line.split()[0]) for line in lines] == ids
    assert lines[0].split(None, 1)[1] == "'Hello'" and lines[1].split(None, 1)[1] == "' world'"
    assert "15 characters, 18 bytes -> 5 tokens" in result.stderr
    special = ok(gptcore("tokenize", "--special", "a<|endoftext|>", cwd=tmp_path))
    assert [int(line.split()[0]) for line in special.stdout.splitlines()] == [64, 50256]


def test_train_with_gpt2_or_a_tokenizer_folder_and_resume_keeps_the_tokenizer(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    ok(gptcore("train", "--data", "corpus.txt", "--out", "gpt2run", "--tokenizer", "gpt2", "--max-iters", "2",
               "--eval-interval", "2", *TINY, cwd=tmp_path))
    model, tokenizer = load_model(tmp_path / "gpt2run")
    assert tokenizer == load_tokenizer("gpt2") and model.config.vocab_size == 50257
    BPETokenizer.train(TEXT, 270).save(tmp_path / "mine")
    ok(gptcore("train", "--data", "corpus.txt", "--out", "minerun", "--tokenizer", "mine", "--max-iters", "2",
               "--eval-interval", "2", *TINY, cwd=tmp_path))
    assert load_model(tmp_path / "minerun")[1] == load_tokenizer(tmp_path / "mine")
    # a run folder is a tokenizer folder too (its current checkpoint's tokenizer.json)
    ok(gptcore("train", "--data", "corpus.txt", "--out", "fromrun", "--tokenizer", "minerun", "--max-iters", "2",
               "--eval-interval", "2", *TINY, cwd=tmp_path))
    assert load_model(tmp_path / "fromrun")[1] == load_tokenizer(tmp_path / "mine")
    refused = gptcore("train", "--out", "minerun", "--resume", "--tokenizer", "gpt2", cwd=tmp_path)
    assert refused.returncode == 2 and "a resumed run keeps its tokenizer" in refused.stderr


def test_char_checkpoints_record_the_vocabulary_hash_they_always_did():
    # checkpoints saved before BPE existed hold sha256(json.dumps(chars)) in model.safetensors
    tok = CharTokenizer.from_text("hello, world\n")
    assert tok.vocab_hash() == hashlib.sha256(json.dumps(list(tok.chars)).encode("utf-8")).hexdigest()


def test_epochs_count_bpe_tokens_not_characters(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    ok(gptcore("train", "--data", "corpus.txt", "--out", "run", "--tokenizer", "bpe:300", "-epochs", "0.05",
               "--eval-interval", "1000", *TINY, cwd=tmp_path))
    tokens = len(BPETokenizer.train(TEXT[:int(len(TEXT) * 0.9)], 300).encode(TEXT))
    steps = json.loads(pathlib.Path(checkpoint_folder(tmp_path / "run"), "trainer_state.json").read_text())[
        "config"]["max_iters"]
    assert steps == math.ceil(0.05 * int(tokens * 0.9) / (4 * 16)) and steps < math.ceil(0.05 * len(TEXT) * 0.9 / 64)


def test_a_char_run_saved_before_the_tokenizer_setting_existed_resumes_as_char(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    ok(gptcore("train", "--data", "corpus.txt", "--out", "run", "--max-iters", "2", "--eval-interval", "2", *TINY,
               cwd=tmp_path))
    folder = pathlib.Path(checkpoint_folder(tmp_path / "run"))
    state_path = folder / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert state["config"].pop("tokenizer") == "char"            # as an older gptcore wrote it
    state_path.write_text(json.dumps(state))
    (folder / "manifest.json").unlink()                           # which had no manifest either
    resumed = ok(gptcore("train", "--out", "run", "--resume", "--max-iters", "4", cwd=tmp_path))
    assert "vocabulary" in resumed.stdout and "characters" in resumed.stdout and "tokenizer" not in resumed.stdout
    assert isinstance(load_model(tmp_path / "run")[1], CharTokenizer)
