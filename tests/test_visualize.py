"""Tests for the pictures (gptcore.visualize, `gptcore visualize`) and the training dynamics
(gptcore.dynamics) that gptcore train records.

WHAT'S GOING ON HERE
  WHAT   1. the pictures are the model's: the attention that visualize plots (and saves as .npy) equals
            one recomputed by hand, in numpy, from the forward's cached q, k, v (<= 1e-6), for every
            block and head; the embedding projection is the PCA of wte; the next-token bars are the
            softmax of the logits forward returned;
         2. the statistics training records are what they say: the update/weight ratios against a
            by-hand copy of the weights before the step, the gradient RMS against the gradients, the
            attention entropy against a by-hand -sum p log p; metrics.jsonl keeps them on every
            evaluation but step 0, marks a resume, and report.html is rewritten at each evaluation;
         3. `gptcore visualize` end to end on a run (char and BPE), and its bad input: a folder without
            metrics (the model only, one line), a prompt longer than the context (cut, one line), an
            empty prompt and characters outside the vocabulary (one error line, exit 2);
         4. the report in a real browser: headless Chromium loads report.html from disk with no console
            message and no request to the network (its NetLog shows none from the page), and its
            screenshot is not blank. A canary page with one console.error and one remote image proves
            the check sees both.
  HOW    A tiny char run (2 layers, 2 heads, 16 channels, block_size 16) trained in-process once for the
         module; the CLI through a subprocess (tests/test_cli.py's helpers). Chromium is Debian's
         `chromium` (make test installs it); without it the browser test is skipped, saying why.
"""
import json
import math
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from gptcore import dynamics, visualize
from gptcore.checkpoint import checkpoint_folder, load_model, save_checkpoint
from gptcore.tokenizer import BPETokenizer, load_tokenizer
from gptcore.train import TrainConfig, setup, train, train_step
from test_cli import assert_clean_error, gptcore, metrics, ok, python_like_text

SMALL = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=2, threads=1,
             progress=False, warmup_iters=2, lr=1e-2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("visualize")
    (folder / "corpus.txt").write_text(python_like_text(8_000) + "def main():\n    return 0\n")
    return folder


@pytest.fixture(scope="module")
def run(workdir):
    """30 steps, an evaluation every 10, a sample at the end -> the run folder."""
    train(TrainConfig(data=str(workdir / "corpus.txt"), out=str(workdir / "run"), max_iters=30, eval_interval=10,
                      sample_tokens=20, **SMALL), log=lambda *_: None)
    return workdir / "run"


def softmax_attention_by_hand(qkv, n_head):
    """qkv (T, 3C) -> att (NH, T, T) in float64: softmax over s <= t of q_t . k_s / sqrt(hs)."""
    T, three_c = qkv.shape
    C = three_c // 3
    hs = C // n_head
    q, k = qkv[:, :C].astype(np.float64), qkv[:, C:2 * C].astype(np.float64)
    att = np.zeros((n_head, T, T))
    for h in range(n_head):
        scores = q[:, h * hs:(h + 1) * hs] @ k[:, h * hs:(h + 1) * hs].T / math.sqrt(hs)
        scores[np.triu(np.ones((T, T), bool), k=1)] = -np.inf
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        att[h] = scores / scores.sum(axis=1, keepdims=True)
    return att


# ----------------------------------------------------------------------------------------------------
# 1. The pictures are the model's
# ----------------------------------------------------------------------------------------------------

def test_plotted_attention_equals_a_hand_recomputation_from_the_cached_qkv(run, tmp_path):
    model, tokenizer = load_model(run)
    ids, notes = visualize.prompt_tokens(tokenizer, "def add(a, b):", model.config.block_size)
    assert notes == []
    saved = visualize.visualize(model, tokenizer, ids, tmp_path / "out")
    for layer in range(model.config.n_layer):
        qkv = model.activations.blocks[layer].attn.qkv[0]            # the forward visualize ran
        expected = softmax_attention_by_hand(qkv, model.config.n_head)
        plotted = saved[f"attention_layer{layer}.npy"]
        assert plotted.shape == (model.config.n_head, len(ids), len(ids))
        assert np.abs(plotted - expected).max() <= 1e-6
        assert np.array_equal(np.load(tmp_path / "out" / f"attention_layer{layer}.npy"), plotted)
        assert np.array_equal(saved["attention_last_position.npy"][layer], plotted[:, -1, :])
    # the first position can only attend to itself
    assert np.all(saved["attention_layer0.npy"][:, 0, 0] == 1.0)


def test_embedding_projection_is_the_pca_of_wte_and_the_bars_the_softmax_of_the_logits(run, tmp_path):
    model, tokenizer = load_model(run)
    ids, _ = visualize.prompt_tokens(tokenizer, "for i in", model.config.block_size)
    saved = visualize.visualize(model, tokenizer, ids, tmp_path / "out")
    wte = model.params["wte.weight"].astype(np.float64)
    centred = wte - wte.mean(axis=0)
    covariance = centred.T @ centred
    values, vectors = np.linalg.eigh(covariance)                   # ascending
    for axis in range(2):
        by_hand = centred @ vectors[:, -1 - axis]
        plotted = saved["embeddings_wte_pca.npy"][:, axis]
        sign = np.sign(by_hand @ plotted)                          # an axis is defined up to its sign
        assert np.abs(plotted - sign * by_hand).max() <= 1e-5
    logits, _ = model.forward(ids[None, :])
    last = logits[0, -1].astype(np.float64)
    probs = np.exp(last - last.max()) / np.exp(last - last.max()).sum()
    assert np.abs(saved["forward_probs.npy"] - probs).max() <= 1e-6
    cosine = saved["embeddings_wpe_cosine.npy"]
    assert np.allclose(np.diag(cosine), 1.0, atol=1e-6) and np.allclose(cosine, cosine.T)


def test_token_labels_show_spaces_newlines_and_partial_utf8_readably():
    gpt2 = load_tokenizer("gpt2")
    space_the = list(gpt2.encode(" the"))
    assert [visualize.token_label(gpt2, i) for i in space_the] == ["␣the"]
    assert visualize.token_label(gpt2, list(gpt2.encode("\n"))[0]) == "\\n"
    emoji = list(gpt2.encode("😀"))                               # 4 bytes, more than one token
    assert len(emoji) > 1
    assert visualize.token_label(gpt2, emoji[0]).startswith("\\x")


# ----------------------------------------------------------------------------------------------------
# 2. The statistics recorded while training
# ----------------------------------------------------------------------------------------------------

def test_recorded_statistics_match_a_by_hand_computation(workdir, tmp_path):
    # no clipping: the gradients the step leaves behind are then the ones it recorded
    config = TrainConfig(data=str(workdir / "corpus.txt"), out=str(tmp_path / "run"), max_iters=5, grad_clip=0.0,
                         **SMALL)
    state = setup(config, log=lambda *_: None)
    try:
        train_step(state)
        before = {name: p.copy() for name, p in state.model.params.items()}
        train_step(state, record_dynamics=True)
        model, recorded = state.model, state.dynamics
        assert recorded["step"] == 2
        for name, p in model.params.items():
            change = np.sqrt(np.mean((p.astype(np.float64) - before[name]) ** 2))
            size = np.sqrt(np.mean(p.astype(np.float64) ** 2))
            assert recorded["update_ratio"][name] == pytest.approx(change / size, rel=1e-4), name
        squares = {name: float(np.sum(g.astype(np.float64) ** 2)) for name, g in model.grads.items()}
        for name in squares:
            by_hand = math.sqrt(squares[name] / model.grads[name].size)
            assert recorded["grad_rms"][name] == pytest.approx(by_hand, rel=1e-5), name
        assert recorded["grad_norm"] == pytest.approx(math.sqrt(sum(squares.values())), rel=1e-5)
        for layer in range(model.config.n_layer):
            att = model.attention_weights(layer)[0].astype(np.float64)           # the first sequence
            logs = np.log(np.where(att > 0, att, 1.0))
            entropy = -(att * logs).sum(axis=-1).mean()
            assert recorded["attn_entropy"][layer] == pytest.approx(entropy, rel=1e-5)
            out = model.activations.blocks[layer].out.astype(np.float64)
            assert recorded["block_out_rms"][layer] == pytest.approx(np.sqrt(np.mean(out ** 2)), rel=1e-6)
        T = model.config.block_size
        assert recorded["attn_entropy_uniform"] == pytest.approx(np.mean(np.log(np.arange(1, T + 1))))
        assert all(e <= recorded["attn_entropy_uniform"] + 1e-6 for e in recorded["attn_entropy"])
    finally:
        state.lock.release()


def test_every_evaluation_but_the_first_records_statistics_and_the_report_is_written(run):
    evaluations = [r for r in metrics(run) if r["eval"]]
    assert [r["step"] for r in evaluations] == [0, 10, 20, 30]
    assert "dynamics" not in evaluations[0]                        # no step has run yet
    model, _ = load_model(run)
    names = [name for name in model.params]
    for record in evaluations[1:]:
        recorded = record["dynamics"]
        assert len(recorded["block_out_rms"]) == len(recorded["attn_entropy"]) == model.config.n_layer
        assert list(recorded["grad_rms"]) == names == list(recorded["update_ratio"])
        assert all(math.isfinite(v) and v > 0 for v in recorded["grad_rms"].values())
        assert all(v is None or (math.isfinite(v) and v > 0) for v in recorded["update_ratio"].values())
    assert not any("dynamics" in r for r in metrics(run) if not r["eval"])
    page = (run / "report.html").read_text()
    assert "Training dynamics" in page and "Samples printed during training" in page
    assert "Attention" in page and page.count("data:image/png;base64,") >= 8    # the end: the model too
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [30] and samples[0]["sample"]


def test_a_resumed_run_marks_the_resume_and_rewrites_the_report(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    result = ok(gptcore("train", "--out", "run", "--resume", "--max-iters", 40, "--no-progress",
                        cwd=tmp_path))
    assert "done: 40 steps" in result.stdout
    records = metrics(copy)
    marked = [r for r in records if "resumed_from" in r]
    assert len(marked) == 1 and marked[0]["resumed_from"] == 30
    assert marked[0]["step"] == 30 and marked[0]["eval"]          # the resumed run's first line: its evaluation
    evaluations = [r for r in records if r["eval"]]
    assert [r["step"] for r in evaluations] == [0, 10, 20, 30, 40]
    assert "dynamics" in evaluations[-1]
    assert (copy / "report.html").stat().st_mtime > (run / "report.html").stat().st_mtime
    assert [json.loads(line)["step"] for line in (copy / "samples.jsonl").read_text().splitlines()] == [30, 40]


# ----------------------------------------------------------------------------------------------------
# 3. `gptcore visualize` end to end, and its bad input
# ----------------------------------------------------------------------------------------------------

def test_visualize_a_run_writes_the_pictures_their_arrays_and_the_report(run, workdir):
    result = ok(gptcore("visualize", "--model", "run", "--prompt", "def main", "--out", "pictures", cwd=workdir))
    out = workdir / "pictures"
    names = sorted(os.listdir(out))
    for name in ["report.html", "attention_layer0.png", "attention_layer1.png", "attention_last_position.png",
                 "embeddings_wte_pca.png", "embeddings_wpe.png", "forward.png", "run_loss.png", "run_loss_log.png",
                 "run_schedule.png", "dynamics.png", "attention_layer0.npy"]:
        assert name in names, name
    for name in names:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert result.stdout.startswith(f"wrote {sum(n.endswith('.png') for n in names)} pictures")
    page = (out / "report.html").read_text()
    assert "The run" in page and "Training dynamics" in page and "Attention" in page
    assert np.load(out / "attention_layer0.npy").shape == (2, 8, 8)          # "def main": 8 characters


def test_a_checkpoint_folder_inside_a_run_finds_the_run(run, workdir):
    folder = pathlib.Path(checkpoint_folder(run)).relative_to(workdir)
    result = ok(gptcore("visualize", "--model", folder, "--prompt", "x = 1", "--out", "pictures", cwd=workdir))
    assert "with the run" in result.stdout and "The run" in (workdir / "pictures" / "report.html").read_text()


def test_a_folder_without_metrics_gets_the_model_pictures_only_and_one_line(run, tmp_path):
    model, tokenizer = load_model(run)
    save_checkpoint(tmp_path / "bare", model, tokenizer)
    result = ok(gptcore("visualize", "--model", "bare", "--prompt", "def", "--out", "pictures", cwd=tmp_path))
    assert result.stdout.splitlines()[0] == \
        "bare has no metrics.jsonl (it is not in a training run): the report shows the model only"
    assert result.stderr == ""
    page = (tmp_path / "pictures" / "report.html").read_text()
    assert "The run" not in page and "Attention" in page
    assert not (tmp_path / "pictures" / "run_loss.png").exists()


def test_a_prompt_longer_than_the_context_is_cut_and_said_so(run, workdir, tmp_path):
    prompt = "for i in range(10):\n    print(i)\n"                             # 33 characters, block_size 16
    result = ok(gptcore("visualize", "--model", workdir / "run", "--prompt", prompt, "--out", tmp_path / "p",
                        cwd=tmp_path))
    assert result.stdout.splitlines()[0] == ("the prompt has 33 tokens, more than the model's context "
                                             "(block_size 16): the pictures use its last 16")
    assert np.load(tmp_path / "p" / "attention_layer1.npy").shape == (2, 16, 16)
    assert "the pictures use its last 16" in (tmp_path / "p" / "report.html").read_text()


@pytest.mark.parametrize("prompt, message", [
    ("", "--prompt is empty: give at least one character of text to follow through the model"),
    ("déf", "--prompt: the text has 1 distinct character(s) not in the tokenizer's vocabulary"),
])
def test_an_empty_prompt_or_unknown_characters_are_one_error_line(run, workdir, tmp_path, prompt, message):
    result = gptcore("visualize", "--model", workdir / "run", "--prompt", prompt, "--out", tmp_path / "p",
                     cwd=tmp_path)
    line = assert_clean_error(result, "visualize")
    assert line.startswith(f"gptcore visualize: error: {message}"), line
    assert not (tmp_path / "p").exists()


def test_visualize_draws_a_bpe_model_with_byte_tokens_as_labels(workdir, tmp_path):
    text = (workdir / "corpus.txt").read_text()
    tokenizer = BPETokenizer.train(text, 300)
    from gptcore.model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0)
    save_checkpoint(tmp_path / "bpe", model, tokenizer)
    ok(gptcore("visualize", "--model", "bpe", "--prompt", "def add(a, b): ☃", "--out", "p", cwd=tmp_path))
    page = (tmp_path / "p" / "report.html").read_text()
    assert "␣" in page and "\\x" in page                       # a space, and the snowman's partial bytes
    T = len(tokenizer.encode("def add(a, b): ☃"))
    assert np.load(tmp_path / "p" / "attention_layer0.npy").shape == (2, T, T)


# ----------------------------------------------------------------------------------------------------
# 4. The report in a real browser
# ----------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")


def open_in_chromium(page, folder):
    """Load `page` from disk in headless Chromium -> (console lines, URLs the page requested over the
    network, the screenshot as an array). Nothing can leave the machine: every host name resolves to
    NOTFOUND. The NetLog records every request the network stack starts; the page's own ones carry the
    page's file:// isolation key (the browser's background requests carry none)."""
    net_log, screenshot = folder / "net.json", folder / "screenshot.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
         "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={folder / 'profile'}",
         "--enable-logging=stderr", "--v=0", f"--log-net-log={net_log}", f"--screenshot={screenshot}",
         "--window-size=1280,2000", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert screenshot.exists(), result.stderr
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requested = [event["params"]["url"] for event in log["events"]
                 if event["type"] == start_job and "file://" in event["params"].get("network_isolation_key", "")]
    import matplotlib.image
    return console, requested, matplotlib.image.imread(screenshot)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian's chromium package: "
                    "`make test` installs it with apt-get when it runs as root)")
def test_the_report_opens_in_chromium_without_console_messages_or_network_requests(run, tmp_path):
    # the canary: the check sees a console message and a request for a remote image
    canary = tmp_path / "canary.html"
    canary.write_text('<!DOCTYPE html><html><body><p>canary</p><img src="http://example.invalid/x.png">'
                      '<script>console.error("canary")</script></body></html>')
    (tmp_path / "a").mkdir()
    console, requested, _ = open_in_chromium(canary, tmp_path / "a")
    assert any('"canary"' in line for line in console) and requested == ["http://example.invalid/x.png"]

    (tmp_path / "b").mkdir()
    console, requested, screenshot = open_in_chromium(run / "report.html", tmp_path / "b")
    assert console == [] and requested == []
    pixels = screenshot[..., :3]
    assert pixels.std() > 0.05                                   # not one colour: text and pictures drawn
    assert (pixels.mean(axis=2) < 0.5).mean() > 0.01             # some dark ink on the white page
