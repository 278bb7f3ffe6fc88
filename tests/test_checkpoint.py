"""Tests for gptcore.checkpoint: round trips, refused damage, and saves that die halfway.

WHAT'S GOING ON HERE
  WHAT   1. round trips: the weights, the optimizer's moments and step count and the trainer's state
            come back bit for bit, and a resumed run takes exactly the steps the uninterrupted run
            takes; the folder holds Hugging Face's file names and GPT-2's tensor names;
         2. refused damage: a missing folder or file, a bad config.json, a truncated or corrupted
            model.safetensors, a tensor missing, unexpected, of the wrong shape or dtype, a tokenizer
            that disagrees with the config, optimizer state that does not fit: each one GptcoreError,
            one line, naming the file and the field or tensor;
         3. crashes (in place): a save that dies while writing a file, or between two files, or leaves a
            temporary file behind, never leaves a checkpoint that loads wrong. A crash is simulated by
            making os.replace or a file's write() raise partway through a save;
         4. run folders: each save a new checkpoint folder, RUN/latest switched last, the newest K
            kept; a save that dies in a file, at the folder's rename or at the switch leaves the
            previous checkpoint current and no trace of itself.
  HOW    The model is tiny (2 layers, 8 channels), so everything runs in milliseconds; "the old values"
         and "the new values" are two training runs' parameters that differ everywhere.
"""
import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from gptcore import checkpoint, files
from gptcore.checkpoint import (CONFIG, MANIFEST, MODEL, MODEL_TYPE, OPTIMIZER, TOKENIZER, TOKENIZER_CONFIG,
                                TRAINER_STATE,
                                load_model, load_training_state, save_checkpoint)
from gptcore.data import BatchSampler
from gptcore.errors import GptcoreError
from gptcore.model import GPT, GPTConfig, parameter_shapes
from gptcore.optim import AdamW
from gptcore.tokenizer import CharTokenizer

TEXT = "to be, or not to be: that is the question.\n"


def make_run(seed=0, steps=2):
    """A tiny model, its tokenizer, an AdamW that has taken `steps` steps, a sampler and the
    trainer state that goes with them."""
    tok = CharTokenizer.from_text(TEXT)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=2, n_head=2, n_embd=8), seed=seed)
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.1)
    sampler = BatchSampler(tok.encode(TEXT * 4), batch_size=2, block_size=8, seed=seed)
    for _ in range(steps):
        train_step(model, opt, sampler)
    state = {"step": steps, "sampler": sampler.state(), "best_val_loss": float("inf"),
             "settings": {"lr": 1e-2, "batch_size": 2}}
    return model, tok, opt, sampler, state


def train_step(model, opt, sampler):
    x, y = sampler.next_batch()
    model.forward(x, y)
    opt.step(model.backward())


def fresh(tok, seed=99):
    """A model and optimizer to load into, with values unlike any saved ones."""
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=2, n_head=2, n_embd=8), seed=seed)
    return model, AdamW(model.params, lr=1e-2, weight_decay=0.1)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture
def saved(tmp_path):
    """A full checkpoint in tmp_path/ckpt; returns (folder, model, tok, opt, sampler, state)."""
    model, tok, opt, sampler, state = make_run()
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, tok, opt, state)
    return folder, model, tok, opt, sampler, state


# ---- 1. round trips ----------------------------------------------------------------------------------

def test_round_trip_gives_back_weights_optimizer_and_trainer_state_bit_for_bit(saved):
    folder, model, tok, opt, _, state = saved
    loaded, loaded_tok = load_model(folder)
    assert same_bits(loaded.flat_params, model.flat_params) and loaded.config == model.config
    assert loaded_tok == tok
    target, target_opt = fresh(tok)
    got_state = load_training_state(folder, target, target_opt)
    assert got_state == state                                 # big sampler ints and inf included
    assert same_bits(target.flat_params, model.flat_params)
    assert target_opt.step_count == opt.step_count == 2
    for name in model.params:
        assert same_bits(target_opt.m[name], opt.m[name]) and same_bits(target_opt.v[name], opt.v[name])


def test_resumed_run_takes_exactly_the_steps_of_the_uninterrupted_run(saved):
    folder, model, tok, opt, sampler, _ = saved
    for _ in range(3):                                         # the uninterrupted run goes on
        train_step(model, opt, sampler)
    resumed, resumed_opt = fresh(tok)
    state = load_training_state(folder, resumed, resumed_opt)
    resumed_sampler = BatchSampler(tok.encode(TEXT * 4), batch_size=2, block_size=8, seed=12345)
    resumed_sampler.set_state(state["sampler"])
    for _ in range(3):
        train_step(resumed, resumed_opt, resumed_sampler)
    assert same_bits(resumed.flat_params, model.flat_params)


def test_checkpoint_folder_uses_hugging_face_file_names_and_gpt2_tensor_names(saved):
    folder, model, tok, *_ = saved
    assert sorted(os.listdir(folder)) == sorted([CONFIG, MODEL, TOKENIZER, TOKENIZER_CONFIG, OPTIMIZER,
                                                 TRAINER_STATE, MANIFEST])
    config = json.loads((folder / CONFIG).read_text())
    # Hugging Face's GPT-2 keys (tests/test_huggingface.py opens such folders in transformers)
    assert config["model_type"] == MODEL_TYPE == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert {key: config[key] for key in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")} == \
        {"vocab_size": tok.vocab_size, "n_positions": 8, "n_layer": 2, "n_head": 2, "n_embd": 8}
    with safe_open(folder / MODEL, framework="np") as f:
        assert list(f.keys()) == sorted(name for name, _ in parameter_shapes(model.config))
        assert f.metadata()["gptcore_step"] == "2"
    assert json.loads((folder / TOKENIZER).read_text("utf-8"))["model"] == {
        "type": "WordLevel", "vocab": {c: i for i, c in enumerate(tok.chars)}, "unk_token": "<unk>"}


def test_saving_a_model_alone_removes_training_state_it_no_longer_matches(saved):
    folder, model, tok, *_ = saved
    save_checkpoint(folder, model, tok)
    assert sorted(os.listdir(folder)) == sorted([CONFIG, MODEL, TOKENIZER, TOKENIZER_CONFIG, MANIFEST])
    assert same_bits(load_model(folder)[0].flat_params, model.flat_params)
    with pytest.raises(GptcoreError, match=f"has no {TRAINER_STATE}"):
        load_training_state(folder, *fresh(tok))


# ---- 2. refused damage -------------------------------------------------------------------------------

@pytest.fixture
def unsigned(saved):
    """The saved checkpoint without its manifest.json, as an older gptcore or another program writes
    it: every structural check below must hold on its own, without the checksums."""
    os.remove(saved[0] / MANIFEST)
    return saved


def load_error(folder, resume=False):
    """The one-line message loading `folder` raises."""
    with pytest.raises(GptcoreError) as err:
        if resume:
            load_training_state(folder, *fresh(CharTokenizer.from_text(TEXT)))
        else:
            load_model(folder)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_folder_or_a_file_instead_of_a_folder(tmp_path):
    assert "does not exist" in load_error(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in load_error(tmp_path / "file")


@pytest.mark.parametrize("name, resume", [(CONFIG, False), (MODEL, False), (TOKENIZER, False),
                                          (OPTIMIZER, True), (TRAINER_STATE, True)])
def test_a_missing_file_is_named(unsigned, name, resume):
    folder = unsigned[0]
    os.remove(folder / name)
    assert f"has no {name}" in load_error(folder, resume)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: "{not json", "is not valid JSON"),
    (lambda c: "[1, 2]", "must hold a JSON object"),
    (lambda c: json.dumps({k: v for k, v in c.items() if k != "model_type"}), 'no "model_type" field'),
    (lambda c: json.dumps({**c, "model_type": "llama"}), "'llama'"),
    (lambda c: json.dumps({k: v for k, v in c.items() if k != "n_layer"}), 'no "n_layer" field'),
    (lambda c: json.dumps({**c, "n_head": "2"}), '"n_head" must be an integer in [1, 2147483647], got \'2\''),
    (lambda c: json.dumps({**c, "n_embd": 0}), '"n_embd" must be an integer in [1, 2147483647], got 0'),
    (lambda c: json.dumps({**c, "n_positions": True}), '"n_positions" must be an integer in [1,'),
    (lambda c: json.dumps({**c, "n_layer": 1e9}), '"n_layer" must be an integer in [1, 2147483647], got 1000000000.0'),
    (lambda c: json.dumps({**c, "n_layer": 2 ** 40}), '"n_layer" must be an integer in [1, 2147483647]'),
    # sizes each allowed, but a model no machine here holds: refused before anything is allocated
    (lambda c: json.dumps({**c, "n_layer": 10 ** 9}), "GiB of memory to load"),
    (lambda c: json.dumps({**c, "vocab_size": 2 ** 31 - 1, "n_embd": 2 ** 20, "n_head": 1}), "GiB of memory"),
    (lambda c: "[" * 200_000 + "]" * 200_000, "nested too deeply"),
    (lambda c: " " * (2 << 20) + "{}", "more than the 1,048,576"),
    (lambda c: json.dumps({**c, "n_head": 3}), '"n_embd" 8 must be divisible by "n_head" 3'),
])
def test_an_invalid_config_json_names_the_field(unsigned, edit, expected):
    folder = unsigned[0]
    (folder / CONFIG).write_text(edit(json.loads((folder / CONFIG).read_text())))
    message = load_error(folder)
    assert expected in message and CONFIG in message


def test_a_truncated_model_safetensors_is_refused(unsigned):
    folder = unsigned[0]
    raw = (folder / MODEL).read_bytes()
    (folder / MODEL).write_bytes(raw[:len(raw) // 2])
    assert f"{MODEL} is truncated or corrupted" in load_error(folder)


@pytest.mark.parametrize("where", ["header length", "header text"])
def test_flipped_bytes_in_the_model_safetensors_header_are_refused(unsigned, where):
    folder = unsigned[0]
    raw = bytearray((folder / MODEL).read_bytes())
    at = 0 if where == "header length" else 20
    raw[at:at + 4] = bytes(b ^ 0xFF for b in raw[at:at + 4])
    (folder / MODEL).write_bytes(bytes(raw))
    assert f"{MODEL} is truncated or corrupted" in load_error(folder)


def rewrite_model(folder, change):
    """Apply change(tensors) to model.safetensors' tensors, keeping its metadata."""
    with safe_open(folder / MODEL, framework="np") as f:
        metadata = f.metadata()
    tensors = load_file(folder / MODEL)
    change(tensors)
    save_file(tensors, folder / MODEL, metadata=metadata)


def test_a_tensor_of_the_wrong_shape_is_named_with_expected_and_got(unsigned):
    folder = unsigned[0]
    rewrite_model(folder, lambda t: t.update({"h.1.mlp.c_fc.weight": np.zeros((8, 16), np.float32)}))
    message = load_error(folder)
    assert "'h.1.mlp.c_fc.weight'" in message and "(8, 16)" in message and "expected (8, 32)" in message


def test_a_tensor_of_the_wrong_dtype_is_named(unsigned):
    folder = unsigned[0]
    rewrite_model(folder, lambda t: t.update({"ln_f.bias": t["ln_f.bias"].astype(np.float64)}))
    message = load_error(folder)
    assert "'ln_f.bias'" in message and "F64" in message and "F32" in message


def test_a_missing_or_unexpected_tensor_is_named(unsigned):
    folder = unsigned[0]
    rewrite_model(folder, lambda t: t.pop("wpe.weight"))
    assert "has no tensor 'wpe.weight' (expected shape (8, 8))" in load_error(folder)
    rewrite_model(folder, lambda t: t.update({"wpe.weight": np.zeros((8, 8), np.float32),
                                              "h.2.ln_1.weight": np.zeros(8, np.float32)}))
    assert "unexpected tensor 'h.2.ln_1.weight'" in load_error(folder)
    # lm_head.weight is GPT-2's tied head: it may be there, with wte's shape (and values)
    rewrite_model(folder, lambda t: (t.pop("h.2.ln_1.weight"), t.update({"lm_head.weight": np.zeros((3, 8), np.float32)})))
    assert "tensor 'lm_head.weight'" in load_error(folder) and "expected (" in load_error(folder)


def test_a_tokenizer_whose_size_disagrees_with_the_config_is_refused(unsigned):
    folder = unsigned[0]
    CharTokenizer.from_text("abc").save(folder)
    message = load_error(folder)
    assert "vocab_size=" in message and "has 3 characters" in message


def test_a_tokenizer_of_the_right_size_but_other_characters_is_refused(unsigned):
    folder, _, tok = unsigned[:3]
    CharTokenizer(tuple(reversed(tok.chars))).save(folder)
    assert f"{TOKENIZER} is not the vocabulary {MODEL} was saved with" in load_error(folder)


def test_a_config_that_changes_no_shape_but_is_not_the_saved_one_is_refused(unsigned):
    folder = unsigned[0]
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, "n_head": 1}))       # same tensor shapes
    assert f"{CONFIG} is not the config {MODEL} was saved with" in load_error(folder)


def test_optimizer_state_that_is_missing_or_the_wrong_shape_is_refused(unsigned):
    folder = unsigned[0]
    moments = load_file(folder / OPTIMIZER)
    with safe_open(folder / OPTIMIZER, framework="np") as f:
        metadata = f.metadata()
    broken = {k: v for k, v in moments.items() if k != "v.h.0.ln_1.bias"}
    save_file(broken, folder / OPTIMIZER, metadata=metadata)
    assert f"{OPTIMIZER} has no tensor 'v.h.0.ln_1.bias'" in load_error(folder, resume=True)
    save_file({**moments, "m.wte.weight": np.zeros((2, 2), np.float32)}, folder / OPTIMIZER, metadata=metadata)
    assert "'m.wte.weight'" in load_error(folder, resume=True)


def test_resuming_into_a_model_of_another_shape_is_refused_and_changes_nothing(unsigned):
    folder, _, tok = unsigned[:3]
    other = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=5)
    before = other.flat_params.copy()
    with pytest.raises(GptcoreError, match="n_layer=2, but the model to resume has n_layer=1"):
        load_training_state(folder, other, AdamW(other.params))
    assert same_bits(other.flat_params, before)


def test_a_failed_resume_leaves_model_and_optimizer_untouched(unsigned):
    folder, _, tok = unsigned[:3]
    raw = (folder / OPTIMIZER).read_bytes()
    (folder / OPTIMIZER).write_bytes(raw[:-10])
    model, opt = fresh(tok)
    before = model.flat_params.copy()
    with pytest.raises(GptcoreError, match=f"{OPTIMIZER} is truncated"):
        load_training_state(folder, model, opt)
    assert same_bits(model.flat_params, before) and opt.step_count == 0


def test_every_edit_of_a_signed_checkpoint_is_refused_by_its_checksum(saved):
    """With manifest.json, any changed byte (here: the edits above, and one flipped bit in the tensor
    data, which safetensors alone cannot see) is refused, naming the file and the manifest."""
    folder = saved[0]
    originals = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    for name, resume in [(CONFIG, False), (MODEL, False), (TOKENIZER, False), (OPTIMIZER, True),
                         (TRAINER_STATE, True)]:
        raw = bytearray(originals[name])
        raw[-2] ^= 0x01                                       # a bit deep in the data (or the JSON)
        (folder / name).write_bytes(bytes(raw))
        message = load_error(folder, resume)
        assert name in message and "sha256" in message and MANIFEST in message
        (folder / name).write_bytes(originals[name][:-1])    # one byte short
        assert name in load_error(folder, resume) and "bytes" in load_error(folder, resume)
        (folder / name).write_bytes(originals[name])
    assert same_bits(load_model(folder)[0].flat_params, saved[1].flat_params)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("signed", [True, False])
def test_a_nonfinite_weight_is_refused_by_tensor_name(saved, value, signed):
    """NaN or inf in the weights (a diverged run saved by another program, or a manifest rewritten
    to match): refused with the tensor's name, never sampled from."""
    folder = saved[0]
    rewrite_model(folder, lambda t: t["h.1.attn.c_proj.weight"].__setitem__((3, 4), value))
    if signed:      # a manifest that vouches for the bad file: the finiteness check still refuses it
        files = {name: (folder / name).read_bytes() for name in (CONFIG, MODEL, TOKENIZER, OPTIMIZER,
                                                                 TRAINER_STATE)}
        (folder / MANIFEST).write_bytes(checkpoint._manifest_bytes(files, 2))
    else:
        os.remove(folder / MANIFEST)
    message = load_error(folder)
    assert "'h.1.attn.c_proj.weight'" in message and "NaN or inf" in message


def test_saving_a_model_with_a_nonfinite_weight_is_refused_before_any_file_is_touched(saved):
    folder, model, tok, opt, _, state = saved
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    model.params["ln_f.bias"][0] = np.nan
    with pytest.raises(ValueError, match="'ln_f.bias' holds NaN or inf"):
        save_checkpoint(folder, model, tok, opt, state)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


# ---- 3. crashes --------------------------------------------------------------------------------------

def checkpoint_files(folder):
    return sorted(os.listdir(folder))


@pytest.fixture
def two_runs(saved):
    """The saved checkpoint ("old") and a second run ("new") whose every parameter differs from it."""
    folder, old_model, tok, old_opt, _, old_state = saved
    new_model, _, new_opt, _, new_state = make_run(seed=1, steps=3)
    assert not np.any(new_model.flat_params == old_model.flat_params)
    return folder, old_model, old_opt, old_state, tok, new_model, new_opt, new_state


def assert_old_checkpoint_loads(folder, old_model, old_opt, old_state, tok):
    assert same_bits(load_model(folder)[0].flat_params, old_model.flat_params)
    model, opt = fresh(tok)
    assert load_training_state(folder, model, opt) == old_state
    assert same_bits(model.flat_params, old_model.flat_params) and opt.step_count == old_opt.step_count


@pytest.mark.parametrize("crash", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_save_that_dies_while_writing_the_weights_leaves_the_old_checkpoint_loadable(
        two_runs, monkeypatch, crash):
    folder, old_model, old_opt, old_state, tok, new_model, new_opt, new_state = two_runs

    class DiesHalfway:
        """A file whose write() puts half the bytes of model.safetensors on disk, then fails."""
        def __init__(self, f):
            self.f = f
        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise crash
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()

    def open_(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return DiesHalfway(f) if os.path.basename(path).startswith(f".{MODEL}.") else f

    monkeypatch.setattr(files, "open", open_, raising=False)       # the open() atomic_write calls
    with pytest.raises(type(crash)):
        save_checkpoint(folder, new_model, tok, new_opt, new_state)
    monkeypatch.undo()
    assert checkpoint_files(folder) == sorted([CONFIG, MODEL, TOKENIZER, TOKENIZER_CONFIG, OPTIMIZER, TRAINER_STATE, MANIFEST])
    assert_old_checkpoint_loads(folder, old_model, old_opt, old_state, tok)


def test_a_save_that_dies_at_the_rename_leaves_the_old_checkpoint_loadable(two_runs, monkeypatch):
    folder, old_model, old_opt, old_state, tok, new_model, new_opt, new_state = two_runs
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == MODEL:
            assert os.path.getsize(src) > 1000                # the new file was written in full...
            raise OSError(5, "Input/output error")            # ...and the rename never happened
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        save_checkpoint(folder, new_model, tok, new_opt, new_state)
    monkeypatch.undo()
    assert checkpoint_files(folder) == sorted([CONFIG, MODEL, TOKENIZER, TOKENIZER_CONFIG, OPTIMIZER, TRAINER_STATE, MANIFEST])
    assert_old_checkpoint_loads(folder, old_model, old_opt, old_state, tok)


def test_a_save_that_dies_between_files_is_detected_as_inconsistent(two_runs, monkeypatch):
    folder, old_model, old_opt, old_state, tok, new_model, new_opt, new_state = two_runs
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == TRAINER_STATE:
            raise OSError(5, "Input/output error")            # weights and moments are new, state old
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        save_checkpoint(folder, new_model, tok, new_opt, new_state)
    monkeypatch.undo()
    # manifest.json (written last) is the old save's: the new files do not match it
    assert "inconsistent" in load_error(folder, resume=True) and MODEL in load_error(folder, resume=True)
    assert "inconsistent" in load_error(folder) and MODEL in load_error(folder)
    # without a manifest (an older flat checkpoint) the save ids in the files still tell
    os.remove(folder / MANIFEST)
    message = load_error(folder, resume=True)
    assert "inconsistent" in message and "step 2" in message and "step 3" in message
    # the model files alone are one save's, and load as the new weights
    assert same_bits(load_model(folder)[0].flat_params, new_model.flat_params)


def test_leftover_temporary_files_are_ignored_by_loading_and_removed_by_the_next_save(saved):
    folder, model, tok, opt, _, state = saved
    (folder / f".{MODEL}.3f2a9c.tmp").write_bytes(b"half a file")      # what a kill -9 leaves
    (folder / "notes.tmp").write_text("not ours")
    assert same_bits(load_model(folder)[0].flat_params, model.flat_params)
    save_checkpoint(folder, model, tok, opt, state)
    assert checkpoint_files(folder) == sorted([CONFIG, MODEL, TOKENIZER, TOKENIZER_CONFIG, OPTIMIZER, TRAINER_STATE, MANIFEST, "notes.tmp"])


def test_a_trainer_state_json_cannot_hold_fails_before_any_file_is_touched(two_runs):
    folder, old_model, old_opt, old_state, tok, new_model, new_opt, new_state = two_runs
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    with pytest.raises(TypeError):
        save_checkpoint(folder, new_model, tok, new_opt, {**new_state, "oops": object()})
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


# ---- 4. run folders: a new checkpoint folder per save, switched by one atomic replace of RUN/latest --

def run_state(step, sampler):
    return {"step": step, "sampler": sampler.state(), "best_val_loss": None}


def test_run_saves_keep_the_newest_k_and_latest_names_them_newest_first(tmp_path):
    model, tok, opt, sampler, _ = make_run()
    run = tmp_path / "run"
    for step in (1, 2, 3):
        checkpoint.save_run_checkpoint(run, model, tok, opt, run_state(step, sampler), keep=2)
    assert (run / checkpoint.LATEST).read_text() == "checkpoints/step-000003\ncheckpoints/step-000002\n"
    assert sorted(os.listdir(run / checkpoint.CHECKPOINTS)) == ["step-000002", "step-000003"]
    assert checkpoint.checkpoint_folder(run) == str(run / checkpoint.CHECKPOINTS / "step-000003")
    assert load_training_state(run, *fresh(tok))["step"] == 3
    # a second save at the same step gets its own folder; replace=True (a new run) keeps only it
    again = checkpoint.save_run_checkpoint(run, model, tok, opt, run_state(3, sampler), keep=2)
    assert os.path.basename(again) == "step-000003.2"
    checkpoint.save_run_checkpoint(run, model, tok, opt, run_state(0, sampler), keep=2, replace=True)
    assert os.listdir(run / checkpoint.CHECKPOINTS) == ["step-000000"]


@pytest.mark.parametrize("dies_at", ["a file", "the rename", "the switch"])
def test_a_run_save_that_dies_anywhere_leaves_the_previous_checkpoint_current_and_nothing_behind(
        tmp_path, monkeypatch, dies_at):
    old_model, tok, old_opt, sampler, _ = make_run()
    new_model, _, new_opt, _, _ = make_run(seed=1, steps=3)
    run = tmp_path / "run"
    checkpoint.save_run_checkpoint(run, old_model, tok, old_opt, run_state(2, sampler))
    before = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    if dies_at == "a file":
        real = files.write_new_file
        def write_new_file(path, data):
            if os.path.basename(path) == OPTIMIZER:
                raise OSError(28, "No space left on device")
            real(path, data)
        monkeypatch.setattr(checkpoint, "write_new_file", write_new_file)
    elif dies_at == "the rename":
        monkeypatch.setattr(os, "rename", lambda src, dst: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    else:
        real_replace = os.replace
        def replace(src, dst):
            if os.path.basename(dst) == checkpoint.LATEST:
                raise KeyboardInterrupt           # a second Ctrl-C at the worst moment
            real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises((OSError, KeyboardInterrupt)):
        checkpoint.save_run_checkpoint(run, new_model, tok, new_opt, run_state(3, sampler))
    monkeypatch.undo()
    after = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before                          # no new folder, no temporary file, old files as they were
    model, opt = fresh(tok)
    assert load_training_state(run, model, opt)["step"] == 2
    assert same_bits(model.flat_params, old_model.flat_params)
