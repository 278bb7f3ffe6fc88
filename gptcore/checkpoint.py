"""gptcore.checkpoint: saving a model (and a training run) to a folder, and loading it back safely.

WHAT'S GOING ON HERE
====================

WHAT
  A checkpoint is a folder laid out the way Hugging Face lays out a model:

      config.json              the GPTConfig fields, plus "model_type": "gptcore-gpt2"
      model.safetensors        every parameter under its GPT-2 name (gptcore.model.parameter_shapes)
      tokenizer.json           the tokenizer (gptcore.tokenizer: gptcore's character list, or
                               Hugging Face's tokenizer.json for byte-level BPE)
    and, to resume training:
      optimizer.safetensors    AdamW's moments m.<name>, v.<name>
      trainer_state.json       the step, the batch sampler's RNG state, best val loss, the training
                               settings (whatever the trainer passes), and the optimizer's step count

  save_checkpoint writes it; load_model(folder) -> (model, tokenizer) is all generation and evaluation
  need; load_training_state(folder, model, optimizer) fills a model and an optimizer in place and
  returns the trainer's state, so a resumed run continues exactly where the saved one stopped.
  read_training_settings(folder) reads the settings alone (trainer_state.json's "config"), which a
  resumed run starts from before it builds anything.

  Loading never unpickles anything. Tensors come from safetensors (a JSON header of names, dtypes,
  shapes and offsets, then raw little-endian bytes) and everything else from JSON, so a checkpoint
  from someone else can at worst fail to load: it cannot run code (torch.load's pickles can).

HOW (a save that is killed halfway)
  Training saves every few hundred steps, and the process can die at any moment (Ctrl-C, out of
  memory, a full disk). Writing a file in place is not safe: a save killed halfway leaves a truncated
  file under the real name, and the last good checkpoint is gone with it. So every file is written
  with gptcore.files.atomic_write: to a temporary file in the same folder
  (".model.safetensors.<random>.tmp"), flushed and fsync'd (the bytes are on disk), and only then
  os.replace'd onto its real name. A rename within one filesystem is atomic, so a reader sees either
  the old file or the new one, never a mixture. Each rename is fsync'd into its folder too, so the
  renames reach the disk in the order we made them.

  That makes each file atomic, but a checkpoint is five files, replaced one after another. A crash
  between two replacements leaves a folder holding some files from the new save and some from the
  old one: new weights, say, with the old optimizer moments. Loading that would not fail; it would
  silently resume a run that never existed. So every save gets a random id, and each file records
  it: the two .safetensors files in their header's string metadata (with the step), and
  trainer_state.json (with the step). model.safetensors also records the config and a hash of the
  vocabulary it was trained with. Loading compares them and refuses a mixture with a message naming
  the files that disagree. The order of the writes is tokenizer.json, config.json, model.safetensors,
  optimizer.safetensors and trainer_state.json last.

  What this does not give: after a crash between replacements the folder is detected as
  inconsistent, not rolled back; the previous checkpoint's files are partly overwritten. A trainer
  that wants an older checkpoint to fall back on should save into a new folder (one per step, say)
  and delete old ones after. Nor can it detect bytes flipped inside the tensor data: safetensors
  checks its header and its length, not the values (it has no checksum). Two processes saving into
  one folder at once are not supported.

  A save left half-done by a kill -9 may leave its ".<name>.<random>.tmp" file behind; the names
  can never be mistaken for checkpoint files, and the next save into the folder deletes them.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import uuid

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_tensors_to_bytes

from gptcore.errors import GptcoreError
from gptcore.files import atomic_write, remove_leftover_temp_files
from gptcore.model import GPT, GPTConfig, parameter_shapes
from gptcore.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

MODEL_TYPE = "gptcore-gpt2"
CONFIG, MODEL, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
OPTIMIZER, TRAINER_STATE = "optimizer.safetensors", "trainer_state.json"
CHECKPOINT_FILES = (TOKENIZER, CONFIG, MODEL, OPTIMIZER, TRAINER_STATE)      # in the order we write them

# the keys save_checkpoint adds to the trainer's dict in trainer_state.json (and load removes again)
_SAVE_ID, _OPTIMIZER_META = "checkpoint_id", "optimizer_meta"
# the string metadata in the .safetensors headers
_META_SAVE_ID, _META_STEP = "gptcore_checkpoint_id", "gptcore_step"
_META_CONFIG, _META_VOCAB = "gptcore_config", "gptcore_vocab_sha256"


# ----------------------------------------------------------------------------------------------------
# Writing files (atomically: gptcore.files)
# ----------------------------------------------------------------------------------------------------

def _save_tensors(path, tensors, metadata):
    """model.safetensors and optimizer.safetensors. We serialize to bytes and write those ourselves:
    safetensors' own save_file renames its own temporary file into place, without an fsync and with
    mode 0600. The cost is one in-memory copy of the tensors while saving."""
    atomic_write(path, save_tensors_to_bytes(tensors, metadata=metadata))


# ----------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------

def _config_dict(config):
    return {field.name: int(getattr(config, field.name)) for field in dataclasses.fields(GPTConfig)}


def _vocab_hash(tokenizer):
    """A hash of the vocabulary itself (not of the file's bytes, which may be reformatted by hand)."""
    return tokenizer.vocab_hash()


def save_checkpoint(folder, model, tokenizer, optimizer=None, trainer_state=None):
    """Write `model` and `tokenizer` (and, to resume training, `optimizer` and `trainer_state`) into
    `folder`, creating it if needed. Each file is replaced atomically; see the module docstring.

    trainer_state: a JSON-serializable dict with at least "step" (int); it comes back unchanged from
    load_training_state. A save without optimizer and trainer_state (a model to share) deletes any
    optimizer.safetensors and trainer_state.json left from an earlier save, since they would no longer
    match the weights."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a gptcore GPT, got {type(model).__name__}")
    if not isinstance(tokenizer, (CharTokenizer, BPETokenizer)):
        raise TypeError(f"tokenizer must be a CharTokenizer or a BPETokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} {tokenizer.unit}s but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    if (optimizer is None) != (trainer_state is None):
        raise ValueError("pass optimizer and trainer_state together (a run to resume) or neither (a model)")

    # Everything is serialized before the first file is touched: a trainer_state that JSON cannot
    # hold must fail here, not after the weights are already replaced.
    save_id = uuid.uuid4().hex
    step = ""
    if trainer_state is not None:
        if not isinstance(trainer_state, dict):
            raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
        step = trainer_state.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f'trainer_state["step"] must be an integer >= 0, got {step!r}')
        step = str(int(step))
        for key in (_SAVE_ID, _OPTIMIZER_META):
            if key in trainer_state:
                raise ValueError(f"trainer_state must not use the key {key!r}: save_checkpoint writes it")
        optimizer_arrays, optimizer_meta = optimizer.state_dict()
        trainer_json = json.dumps({**trainer_state, _SAVE_ID: save_id, _OPTIMIZER_META: optimizer_meta},
                                  indent=2) + "\n"
    config = _config_dict(model.config)
    config_json = json.dumps({"model_type": MODEL_TYPE, **config}, indent=2) + "\n"
    metadata = {"format": "np", _META_SAVE_ID: save_id, _META_STEP: step}
    model_metadata = {**metadata, "model_type": MODEL_TYPE, _META_CONFIG: json.dumps(config, sort_keys=True),
                      _META_VOCAB: _vocab_hash(tokenizer)}

    os.makedirs(folder, exist_ok=True)
    remove_leftover_temp_files(folder, CHECKPOINT_FILES)
    # the order matters: trainer_state.json last (the module docstring says why)
    atomic_write(os.path.join(folder, TOKENIZER), tokenizer.to_json().encode("utf-8"))
    atomic_write(os.path.join(folder, CONFIG), config_json.encode("utf-8"))
    _save_tensors(os.path.join(folder, MODEL),
                  {name: model.params[name] for name, _ in parameter_shapes(model.config)}, model_metadata)
    if optimizer is None:
        for name in (TRAINER_STATE, OPTIMIZER):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
        return
    _save_tensors(os.path.join(folder, OPTIMIZER),
                  {name: np.ascontiguousarray(a) for name, a in optimizer_arrays.items()}, metadata)
    atomic_write(os.path.join(folder, TRAINER_STATE), trainer_json.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------
# Loading: every check raises GptcoreError with one line naming the file and what is wrong with it
# ----------------------------------------------------------------------------------------------------

def _one_line(error):
    return " ".join(str(error).split())


def _check_folder(folder):
    if not os.path.exists(folder):
        raise GptcoreError(f"checkpoint folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise GptcoreError(f"checkpoint {folder} is not a folder (a checkpoint is a folder holding "
                           f"{CONFIG}, {MODEL} and {TOKENIZER})")
    return folder


def _require(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise GptcoreError(f"checkpoint {folder} has no {name}")
    return path


def _read_json(folder, name):
    path = _require(folder, name)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise GptcoreError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise GptcoreError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise GptcoreError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise GptcoreError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return path, data


def _read_config(folder):
    path, data = _read_json(folder, CONFIG)
    if "model_type" not in data:
        raise GptcoreError(f'{path} has no "model_type" field (expected "{MODEL_TYPE}")')
    if data["model_type"] != MODEL_TYPE:
        raise GptcoreError(f'{path} has "model_type": {data["model_type"]!r}; gptcore loads only '
                           f'"{MODEL_TYPE}" checkpoints')
    values = {}
    # fields other than these (and model_type) are ignored, as Hugging Face's configs carry extras
    for field in dataclasses.fields(GPTConfig):
        if field.name not in data:
            raise GptcoreError(f'{path} has no "{field.name}" field')
        value = data[field.name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GptcoreError(f'{path}: "{field.name}" must be a positive integer, got {value!r}')
        values[field.name] = value
    try:
        return GPTConfig(**values)
    except ValueError as e:
        raise GptcoreError(f"{path}: {e}") from None


def _read_tensors(folder, name, expected):
    """Open a .safetensors file and check it holds exactly the float32 tensors in `expected`, an
    ordered list of (name, shape). Returns ({name: array}, string metadata)."""
    path = _require(folder, name)
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            present = set(f.keys())
            wanted = dict(expected)
            missing = [key for key, _ in expected if key not in present]
            if missing:
                raise GptcoreError(f"{path} has no tensor {missing[0]!r} (expected shape {wanted[missing[0]]})"
                                   + (f"; {len(missing)} tensors are missing" if len(missing) > 1 else ""))
            unexpected = sorted(present - set(wanted))
            if unexpected:
                raise GptcoreError(f"{path} has an unexpected tensor {unexpected[0]!r} that the model in "
                                   f"{CONFIG} does not have" + (f" ({len(unexpected)} in all)"
                                                                if len(unexpected) > 1 else ""))
            tensors = {}
            for key, shape in expected:
                view = f.get_slice(key)
                got_shape, got_dtype = tuple(view.get_shape()), view.get_dtype()
                if got_shape != tuple(shape):
                    raise GptcoreError(f"tensor {key!r} in {path} has shape {got_shape}, expected "
                                       f"{tuple(shape)} for the model in {CONFIG}")
                if got_dtype != "F32":
                    raise GptcoreError(f"tensor {key!r} in {path} has dtype {got_dtype}, expected F32 (float32)")
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise GptcoreError(f"{path} is truncated or corrupted: {_one_line(e)}") from None
    return tensors, metadata


def _load_model_files(folder):
    """config.json, tokenizer.json and model.safetensors, checked each alone and against each other."""
    _check_folder(folder)
    config = _read_config(folder)
    tokenizer = load_tokenizer(_require(folder, TOKENIZER))
    if tokenizer.vocab_size != config.vocab_size:
        raise GptcoreError(f"checkpoint {folder} is inconsistent: {CONFIG} has vocab_size="
                           f"{config.vocab_size} but {TOKENIZER} has {tokenizer.vocab_size} {tokenizer.unit}s")
    tensors, metadata = _read_tensors(folder, MODEL, parameter_shapes(config))
    # A file from outside gptcore may carry none of our metadata; then the shape checks above are all
    # we can do. Ours always does, and a mismatch means the files come from different saves.
    if _META_CONFIG in metadata and metadata[_META_CONFIG] != json.dumps(_config_dict(config), sort_keys=True):
        raise GptcoreError(f"checkpoint {folder} is inconsistent: {CONFIG} is not the config "
                           f"{MODEL} was saved with ({metadata[_META_CONFIG]}); was a save interrupted?")
    if _META_VOCAB in metadata and metadata[_META_VOCAB] != _vocab_hash(tokenizer):
        raise GptcoreError(f"checkpoint {folder} is inconsistent: {TOKENIZER} is not the vocabulary "
                           f"{MODEL} was saved with; was a save interrupted?")
    return config, tokenizer, tensors, metadata


def load_model(folder, backend=None):
    """A checkpoint folder -> (GPT with the saved weights, its tokenizer). Raises GptcoreError."""
    config, tokenizer, tensors, _ = _load_model_files(folder)
    model = GPT(config, backend=backend)
    for name, value in tensors.items():
        model.params[name][...] = value
    return model, tokenizer


def read_training_settings(folder):
    """The training settings saved with the run in `folder`: trainer_state.json's "config" dict (the
    gptcore.train.TrainConfig fields), read without loading any tensor. Raises GptcoreError."""
    _check_folder(folder)
    path, state = _read_json(folder, TRAINER_STATE)
    settings = state.get("config")
    if not isinstance(settings, dict):
        raise GptcoreError(f'{path} has no "config" object: it holds no training settings to resume with')
    return settings


def load_training_state(folder, model, optimizer):
    """Resume: fill model.params and the optimizer's state in place from `folder`; return the trainer
    state dict exactly as it was passed to save_checkpoint. Nothing is changed unless every file
    checks out. Raises GptcoreError."""
    config, _, tensors, model_meta = _load_model_files(folder)
    for field, value in _config_dict(config).items():
        if getattr(model.config, field) != value:
            raise GptcoreError(f"checkpoint {folder} holds a model with {field}={value}, but the model "
                               f"to resume has {field}={getattr(model.config, field)}")
    path, state = _read_json(folder, TRAINER_STATE)
    step, save_id = state.get("step"), state.get(_SAVE_ID)
    if isinstance(step, bool) or not isinstance(step, int) or not isinstance(save_id, str) \
            or not isinstance(state.get(_OPTIMIZER_META), dict):
        raise GptcoreError(f'{path} needs an integer "step", a "{_SAVE_ID}" string and an '
                           f'"{_OPTIMIZER_META}" object; it was not written by save_checkpoint')
    optimizer_arrays, _ = optimizer.state_dict()
    expected = [(name, tuple(np.shape(a))) for name, a in optimizer_arrays.items()]
    optimizer_tensors, optimizer_meta = _read_tensors(folder, OPTIMIZER, expected)
    # the consistency check: the three files of a resumable checkpoint must come from one save
    for name, meta in ((MODEL, model_meta), (OPTIMIZER, optimizer_meta)):
        if meta.get(_META_SAVE_ID) != save_id:
            raise GptcoreError(f"checkpoint {folder} is inconsistent: {TRAINER_STATE} is from step {step} "
                               f"but {name} is from step {meta.get(_META_STEP) or '(none)'} of another "
                               f"save (a save was interrupted between files); resume from another checkpoint")
    # every check passed: now, and only now, change the model and the optimizer
    for name, value in tensors.items():
        model.params[name][...] = value
    optimizer.load_state_dict(optimizer_tensors, state[_OPTIMIZER_META])
    return {key: value for key, value in state.items() if key not in (_SAVE_ID, _OPTIMIZER_META)}
