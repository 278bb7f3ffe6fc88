"""Tests for Hugging Face GPT-2 folders in gptcore (gptcore.huggingface, gptcore.checkpoint), both ways.

WHAT'S GOING ON HERE
  WHAT   1. in: a folder transformers' GPT2LMHeadModel.save_pretrained wrote (random weights, odd
            configs: 3 and 5 heads, contexts of 37 and 100 positions; names with and without
            "transformer.", the old mask buffers, a tied lm_head.weight, gelu_pytorch_tanh; float16
            and bfloat16 files) loads into gptcore with logits within 1e-4 of transformers';
         2. the real GPT-2 124M shapes (random weights): logits at a few positions, one training
            step's loss and the gradients of a few tensors against PyTorch's;
         3. greedy generation gives exactly transformers' generate(do_sample=False) tokens, in-process
            and through `gptcore generate --temperature 0`; --num-samples; `gptcore eval` of a
            Hugging Face folder is transformers' mean loss over the same windows;
         4. out: a checkpoint `gptcore train` wrote (character and GPT-2 tokenizer) opens in
            GPT2LMHeadModel.from_pretrained with the same logits, and in AutoTokenizer and
            tokenizers.Tokenizer with the same ids (an unknown character refused by both); an older
            gptcore checkpoint ("gptcore-gpt2", {"type": "char"}) still loads;
         5. `train --init-from` a Hugging Face folder: step 0 is the initial model (wpe cropped to
            --block-size), validation loss goes down on a new text, the checkpoint opens in
            transformers, and --resume continues the run;
         6. every bad folder (pickle only, mismatched shapes, unknown model_type, an lm_head that is not
            tied, each config setting gptcore does not implement) is one line and exit status 2.
  HOW    transformers and torch are oracles only; every model is built here, offline
         (HF_HUB_OFFLINE=1), and all but the 124M one are tiny. CLI runs go through
         tests/test_cli.py's helpers (`python -m gptcore` with PYTHONPATH at this repository).
"""
import json
import os
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from test_cli import assert_clean_error, gptcore, ok, python_like_text, trainer_state
from tolerances import rel_err, worst

from gptcore.checkpoint import checkpoint_folder, load_model
from gptcore.errors import GptcoreError
from gptcore.tokenizer import GPT2_FOLDER, CharTokenizer, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

GPT2_VOCAB = 50257


def char_tokenizer(vocab_size):
    """A character vocabulary of exactly vocab_size printable characters."""
    return CharTokenizer([chr(0x21 + i) for i in range(vocab_size)])


def hf_model(torch, seed=0, **config):
    """A random transformers GPT2LMHeadModel (eval mode: no dropout)."""
    torch.manual_seed(seed)
    config.setdefault("bos_token_id", None)
    config.setdefault("eos_token_id", None)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()


def save_hf(model, folder, tokenizer):
    """model.save_pretrained(folder) and the tokenizer's files next to it, as a downloaded folder has."""
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def hf_logits(torch, model, idx):
    with torch.no_grad():
        return model(torch.tensor(idx)).logits.numpy()


def random_ids(vocab_size, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab_size, shape)


def edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


# ----------------------------------------------------------------------------------------------------
# 1. In: transformers' folders load with the same logits
# ----------------------------------------------------------------------------------------------------

ODD_CONFIGS = [
    dict(n_layer=2, n_head=3, n_embd=48, n_positions=37, vocab_size=71),       # hs 16, 3 heads, T 37
    dict(n_layer=1, n_head=5, n_embd=40, n_positions=100, vocab_size=300),     # 5 heads of 8
    dict(n_layer=2, n_head=2, n_embd=32, n_positions=24, vocab_size=50, activation_function="gelu_pytorch_tanh"),
]


@pytest.mark.parametrize("config", ODD_CONFIGS, ids=["3heads-T37", "5heads-T100", "gelu_pytorch_tanh"])
def test_hf_folder_gives_transformers_logits(torch, tmp_path, config):
    model = hf_model(torch, **config)
    folder = save_hf(model, tmp_path / "hf", char_tokenizer(config["vocab_size"]))
    with open(folder / "config.json") as f:
        assert json.load(f)["model_type"] == "gpt2"
    ours, tokenizer = load_model(folder)
    assert ours.config.block_size == config["n_positions"] and tokenizer.vocab_size == config["vocab_size"]
    idx = random_ids(config["vocab_size"], (2, config["n_positions"]))
    logits, _ = ours.forward(idx)
    assert np.abs(logits - hf_logits(torch, model, idx)).max() <= 1e-4


def test_hf_names_without_prefix_with_mask_buffers_and_tied_lm_head_load(torch, tmp_path):
    """The layout of the files on the Hub: no "transformer." prefix, h.N.attn.bias mask buffers, and
    (some) an lm_head.weight that is wte again."""
    config = ODD_CONFIGS[0]
    model = hf_model(torch, **config)
    folder = save_hf(model, tmp_path / "hf", char_tokenizer(config["vocab_size"]))
    tensors = {name.removeprefix("transformer."): value for name, value in load_file(folder / "model.safetensors").items()}
    T = config["n_positions"]
    for i in range(config["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((T, T), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"].copy()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    ours, _ = load_model(folder)
    idx = random_ids(config["vocab_size"], (1, T))
    assert np.abs(ours.forward(idx)[0] - hf_logits(torch, model, idx)).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files_are_converted_to_float32_with_a_note(torch, tmp_path, dtype):
    config = ODD_CONFIGS[0]
    model = hf_model(torch, **config).to(getattr(torch, dtype))
    folder = save_hf(model, tmp_path / "hf", char_tokenizer(config["vocab_size"]))
    notes = []
    ours, _ = load_model(folder, log=notes.append)
    assert len(notes) == 1 and f"{dtype} tensors to float32" in notes[0], notes
    # the oracle: the same rounded weights, computed in float32
    model = model.float()
    for name, value in model.transformer.state_dict().items():
        if name in ours.params:
            assert np.array_equal(ours.params[name], value.numpy()), name
    idx = random_ids(config["vocab_size"], (1, config["n_positions"]))
    assert np.abs(ours.forward(idx)[0] - hf_logits(torch, model, idx)).max() <= 1e-4


# ----------------------------------------------------------------------------------------------------
# 2. GPT-2 124M's shapes: logits, one training step's loss and gradients
# ----------------------------------------------------------------------------------------------------

def test_gpt2_124m_shapes_match_pytorch_logits_loss_and_gradients(torch, tmp_path):
    model = hf_model(torch, n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=GPT2_VOCAB,
                     bos_token_id=50256, eos_token_id=50256)
    folder = tmp_path / "gpt2-124m"
    model.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):          # GPT-2's original tokenizer files
        shutil.copy(os.path.join(GPT2_FOLDER, name), folder)
    ours, tokenizer = load_model(folder)
    assert ours.num_parameters == 124_439_808 and tokenizer.vocab_size == GPT2_VOCAB
    idx = random_ids(GPT2_VOCAB, (1, 64))
    targets = random_ids(GPT2_VOCAB, (1, 64), seed=1)
    logits, _ = ours.forward(idx)
    _, loss = ours.forward(idx, targets)
    grads = ours.backward()
    # PyTorch: the same step, loss = mean cross-entropy (HF's labels shift by one, so we pass logits)
    out = model(torch.tensor(idx)).logits
    t_loss = torch.nn.functional.cross_entropy(out.view(-1, GPT2_VOCAB), torch.tensor(targets).view(-1))
    t_loss.backward()
    positions = [0, 31, 63]
    assert np.abs(logits[0, positions] - out.detach().numpy()[0, positions]).max() <= 1e-4
    assert abs(loss - t_loss.item()) / t_loss.item() <= 1e-4
    params = dict(model.transformer.named_parameters())
    errors = {name: rel_err(grads[name], params[name].grad.numpy())
              for name in ("wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.11.mlp.c_proj.weight",
                           "ln_f.weight")}
    assert worst(errors)[0] <= 1e-4, f"worst gradient: {worst(errors)}"


# ----------------------------------------------------------------------------------------------------
# 3. Greedy generation is transformers' generate(do_sample=False), token for token
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A small random GPT-2 with GPT-2's real tokenizer (tokenizer.json, as on the Hub)."""
    import torch
    folder = tmp_path_factory.mktemp("hf") / "gpt2-small"
    model = hf_model(torch, n_layer=2, n_head=3, n_embd=48, n_positions=64, vocab_size=GPT2_VOCAB,
                     bos_token_id=50256, eos_token_id=50256)
    save_hf(model, folder, load_tokenizer("gpt2"))
    return folder, model


def test_greedy_generation_matches_transformers_generate(torch, gpt2_folder):
    from gptcore.sample import generate
    folder, model = gpt2_folder
    ours, tokenizer = load_model(folder)
    prompt = list(tokenizer.encode("The meaning of life is"))
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                  pad_token_id=50256, eos_token_id=None).numpy()[0, len(prompt):]
    got = list(generate(ours, prompt, 40, temperature=0))
    assert got == expected.tolist()


def test_cli_generate_from_hf_folder_is_greedy_transformers_and_draws_num_samples(torch, gpt2_folder, tmp_path):
    folder, model = gpt2_folder
    tokenizer = load_tokenizer(folder)
    prompt = "Hello, world"
    ids = list(tokenizer.encode(prompt))
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=50256,
                                  eos_token_id=None).numpy()[0].tolist()
    result = ok(gptcore("generate", "--model", folder, "--prompt", prompt, "--max-new-tokens", 20,
                        "--temperature", 0, cwd=tmp_path))
    assert result.stdout == tokenizer.decode(expected) + "\n"
    one = ok(gptcore("generate", "--model", folder, "--prompt", prompt, "--max-new-tokens", 8, "--seed", 3,
                     "--top-k", 50, cwd=tmp_path))
    three = ok(gptcore("generate", "--model", folder, "--prompt", prompt, "--max-new-tokens", 8, "--seed", 3,
                       "--top-k", 50, "--num-samples", 3, cwd=tmp_path))
    samples = three.stdout.split("-" * 60 + "\n")
    assert len(samples) == 3 and samples[0] == one.stdout
    assert all(sample.startswith(prompt) for sample in samples) and len(set(samples)) == 3
    assert three.stderr.startswith("24 tokens in ")


class FixedDraw:
    """A stand-in for numpy's Generator whose one uniform draw is u: next_token inverts its
    cumulative distribution (over token ids in order) at u, so each u picks a known token."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                       (0.9, 20, 0.5), (1.0, 1, None), (2.0, None, 0.05)])
def test_sampling_draws_from_the_distribution_transformers_warpers_give(torch, temperature, top_k, top_p):
    """temperature, then top-k, then top-p, as transformers applies them: every token transformers
    keeps is drawn with the probability transformers gives it (the middle of its slice of the
    cumulative distribution picks it), and no other token ever is (the slices cover [0, 1))."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    from gptcore.sample import next_token
    logits = np.random.default_rng(7).normal(0, 3, 200).astype(np.float32)
    scores = torch.tensor(logits[None].astype(np.float64))
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1).numpy()[0]
    kept = np.flatnonzero(probs > 0)
    assert 0 < len(kept) < len(probs) or (top_k is None and top_p is None)
    cumulative = np.cumsum(probs)
    for token in kept:
        middle = cumulative[token] - probs[token] / 2
        assert next_token(logits, FixedDraw(middle), temperature, top_k, top_p) == token
        # and the slice has transformers' width: its two ends, just inside, still pick it
        for u in (cumulative[token] - probs[token] * 0.999, cumulative[token] - probs[token] * 0.001):
            assert next_token(logits, FixedDraw(u), temperature, top_k, top_p) == token


def test_cli_eval_of_hf_folder_is_transformers_loss_over_the_windows(torch, gpt2_folder, tmp_path):
    from gptcore.data import eval_windows
    folder, model = gpt2_folder
    text = python_like_text(3000, seed=2)
    (tmp_path / "text.txt").write_text(text)
    result = ok(gptcore("eval", "--model", folder, "--data", "text.txt", cwd=tmp_path))
    ids = np.asarray(load_tokenizer(folder).encode(text), np.int64)
    total, count = 0.0, 0
    for x, y in eval_windows(ids, 64, 32):
        logits = model(torch.tensor(x)).logits
        total += torch.nn.functional.cross_entropy(logits.view(-1, GPT2_VOCAB), torch.tensor(y).view(-1),
                                                   reduction="sum").item()
        count += y.size
    reported = float(result.stdout.split("loss ")[1].split(" ")[0])
    assert abs(reported - total / count) < 1e-4


# ----------------------------------------------------------------------------------------------------
# 4. Out: gptcore's checkpoints open in transformers, with the same logits and ids
# ----------------------------------------------------------------------------------------------------

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--threads", "1", "--sample-tokens", "0", "--no-progress"]


@pytest.mark.parametrize("tokenizer_flag", ["char", "gpt2"])
def test_gptcore_checkpoint_opens_in_transformers_with_same_logits_and_ids(torch, tmp_path, tokenizer_flag):
    text = python_like_text(6000) + "Ünïcödé ✓\n\t"
    (tmp_path / "data.txt").write_text(text, encoding="utf-8")
    ok(gptcore("train", "--data", "data.txt", "--out", "run", "--tokenizer", tokenizer_flag,
               "--max-iters", 5, "--eval-interval", 5, *TINY, cwd=tmp_path))
    folder = checkpoint_folder(tmp_path / "run")
    ours, tokenizer = load_model(folder)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    idx = random_ids(ours.config.vocab_size, (2, 16))
    assert np.abs(ours.forward(idx)[0] - hf_logits(torch, hf, idx)).max() <= 1e-4

    auto = transformers.AutoTokenizer.from_pretrained(folder)
    fast = __import__("tokenizers").Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    sample = text[:500] + "Ünïcödé ✓\n\n  \t"
    ids = list(tokenizer.encode(sample))
    assert auto(sample)["input_ids"] == ids
    assert fast.encode(sample).ids == ids
    assert auto.decode(ids) == sample == fast.decode(ids)
    if tokenizer_flag == "char":      # a character never seen: gptcore refuses it, and so does Hugging Face
        with pytest.raises(GptcoreError, match="not in the tokenizer's vocabulary"):
            tokenizer.encode("def λ")
        with pytest.raises(Exception, match="Missing \\[UNK\\] token"):
            fast.encode("def λ")
        with pytest.raises(Exception, match="Missing \\[UNK\\] token"):
            auto("def λ")


def _char_pipeline(**changes):
    data = json.loads(CharTokenizer.from_text("abc\n").to_json())
    for key, value in changes.items():
        if key.startswith("model_"):
            data["model"][key[len("model_"):]] = value
        else:
            data[key] = value
    return json.dumps(data)


@pytest.mark.parametrize("text, message", [
    (_char_pipeline(decoder=None), '"decoder" must be {"type": "Fuse"}'),
    (_char_pipeline(pre_tokenizer={"type": "Whitespace"}), '"pre_tokenizer" must be'),
    (_char_pipeline(model_unk_token="a"), "the unk_token 'a' is in the vocabulary"),
    (_char_pipeline(model_vocab={"a": 0, "b": 2}), "ids must be 0, 1, ..., 1, each once"),
    (_char_pipeline(model_vocab={"a": 0, "bc": 1}), "vocab[1] is 'bc', not a single character"),
    (_char_pipeline(added_tokens=[{"id": 4, "content": "<s>"}]), 'has no "added_tokens"'),
])
def test_a_char_tokenizer_json_hugging_face_would_read_differently_is_refused(tmp_path, text, message):
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(GptcoreError, match=re.escape(message)):
        load_tokenizer(tmp_path)


def test_older_gptcore_checkpoint_still_loads(tmp_path):
    """The layout of gptcore checkpoints before Hugging Face's keys: "model_type": "gptcore-gpt2",
    GPTConfig's field names, a {"type": "char"} tokenizer.json, no manifest."""
    from gptcore.checkpoint import save_checkpoint
    from gptcore.model import GPT, GPTConfig
    tokenizer = CharTokenizer.from_text("hello world\n")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=3)
    save_checkpoint(tmp_path, model, tokenizer)
    os.unlink(tmp_path / "manifest.json")
    os.unlink(tmp_path / "tokenizer_config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gptcore-gpt2", "vocab_size": tokenizer.vocab_size,
                                                      "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 8}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "char", "vocab": list(tokenizer.chars)}))
    loaded, loaded_tokenizer = load_model(tmp_path)
    assert loaded_tokenizer == tokenizer and loaded.config == model.config
    assert np.array_equal(loaded.flat_params, model.flat_params)


# ----------------------------------------------------------------------------------------------------
# 5. train --init-from: fine-tuning a Hugging Face GPT-2
# ----------------------------------------------------------------------------------------------------

def test_init_from_fine_tunes_crops_context_resumes_and_writes_what_transformers_opens(torch, gpt2_folder,
                                                                                      tmp_path):
    folder, hf = gpt2_folder
    (tmp_path / "new.txt").write_text(python_like_text(8000, seed=5))
    common = ["--batch-size", "4", "--eval-iters", "4", "--threads", "1", "--sample-tokens", "0",
              "--no-progress", "--lr", "3e-3", "--warmup-iters", "0"]
    result = ok(gptcore("train", "--init-from", folder, "--data", "new.txt", "--out", "run", "--block-size", 32,
                        "--max-iters", 30, "--eval-interval", 15, *common, cwd=tmp_path))
    assert f"initialized from {folder}" in result.stdout
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in evals if r.get("eval")]
    assert len(val) == 3 and val[-1] < val[0] - 0.5, val

    ours, tokenizer = load_model(tmp_path / "run")
    assert (ours.config.block_size, ours.config.n_layer, ours.config.n_embd) == (32, 2, 48)
    assert tokenizer == load_tokenizer(folder)
    # the checkpoint opens in transformers, with 32 positions and the same logits
    tuned = transformers.GPT2LMHeadModel.from_pretrained(checkpoint_folder(tmp_path / "run")).eval()
    assert tuned.config.n_positions == 32
    idx = random_ids(GPT2_VOCAB, (2, 32))
    assert np.abs(ours.forward(idx)[0] - hf_logits(torch, tuned, idx)).max() <= 1e-4
    # step 0 was the initial model, its context cropped to 32 positions: wpe's first rows
    cropped, _ = load_model(folder, block_size=32)
    assert np.array_equal(cropped.params["wpe.weight"], hf.transformer.wpe.weight.detach().numpy()[:32])
    assert np.abs(cropped.forward(idx)[0] - hf_logits(torch, hf, idx)).max() <= 1e-4

    resumed = ok(gptcore("train", "--resume", "--out", "run", "--max-iters", 35, "--no-progress", cwd=tmp_path))
    assert "resuming at step 30" in resumed.stdout
    assert trainer_state(tmp_path / "run")["step"] == 35


@pytest.mark.parametrize("flags, message", [
    (["--block-size", "65"], "--block-size 65 is more than the 64 positions"),
    (["--n-layer", "3"], "--n-layer 3 does not match the model in"),
    (["--tokenizer", "char"], "uses the initial model's tokenizer"),
])
def test_init_from_refuses_what_contradicts_the_model(gpt2_folder, tmp_path, flags, message):
    folder, _ = gpt2_folder
    (tmp_path / "new.txt").write_text(python_like_text(3000))
    result = gptcore("train", "--init-from", folder, "--data", "new.txt", "--out", "run", *flags, cwd=tmp_path)
    assert message in assert_clean_error(result, "train")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------
# 6. Bad folders: one line, exit status 2
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_hf_folder(tmp_path_factory):
    import torch
    config = ODD_CONFIGS[0]
    folder = tmp_path_factory.mktemp("bad") / "hf"
    save_hf(hf_model(torch, **config), folder, char_tokenizer(config["vocab_size"]))
    return folder


def _pickle_only(folder):
    os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")


def _untied_head(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1e-3
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


BAD_FOLDERS = {
    "pickle-only": (_pickle_only, "has pytorch_model.bin (a PyTorch pickle) but no model.safetensors"),
    "shapes": (lambda f: edit_config(f, n_positions=40), "has shape (37, 48), expected (40, 48)"),
    "model_type": (lambda f: edit_config(f, model_type="llama"), "\"model_type\": 'llama'; gptcore loads only"),
    "untied-lm_head": (_untied_head, "differs from the token embedding wte.weight"),
    "inverse-layer-idx": (lambda f: edit_config(f, scale_attn_by_inverse_layer_idx=True),
                          '"scale_attn_by_inverse_layer_idx": True is not supported'),
    "upcast": (lambda f: edit_config(f, reorder_and_upcast_attn=True), '"reorder_and_upcast_attn": True is not'),
    "relu": (lambda f: edit_config(f, activation_function="relu"), "\"activation_function\": 'relu' is not"),
    "exact-gelu": (lambda f: edit_config(f, activation_function="gelu"), "\"activation_function\": 'gelu' is not"),
    "n_inner": (lambda f: edit_config(f, n_inner=100), '"n_inner": 100 is not supported'),
    "epsilon": (lambda f: edit_config(f, layer_norm_epsilon=1e-6), '"layer_norm_epsilon": 1e-06 is not supported'),
    "untied-config": (lambda f: edit_config(f, tie_word_embeddings=False), '"tie_word_embeddings": False is not'),
    "unscaled": (lambda f: edit_config(f, scale_attn_weights=False), '"scale_attn_weights": False is not'),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_hf_folder_is_one_line_and_exit_2(small_hf_folder, tmp_path, case):
    folder = tmp_path / "hf"
    shutil.copytree(small_hf_folder, folder)
    spoil, message = BAD_FOLDERS[case]
    spoil(folder)
    result = gptcore("generate", "--model", folder, "--max-new-tokens", 2, cwd=tmp_path)
    assert message in assert_clean_error(result, "generate")
