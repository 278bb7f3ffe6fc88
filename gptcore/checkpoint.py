"""gptcore.checkpoint: saving a model (and a training run) to a folder, and loading it back safely.

WHAT'S GOING ON HERE
====================

WHAT
  A checkpoint is a folder laid out the way Hugging Face lays out a model:

      config.json              Hugging Face's GPT-2 config ("model_type": "gpt2", n_layer, n_head,
                               n_embd, n_positions = block_size, vocab_size, ...: gptcore.huggingface)
      model.safetensors        every parameter under its GPT-2 name (gptcore.model.parameter_shapes)
      tokenizer.json           the tokenizer, in Hugging Face's layout (gptcore.tokenizer for a
      tokenizer_config.json    character vocabulary, gptcore.bpe for byte-level BPE)
    and, to resume training:
      optimizer.safetensors    AdamW's moments m.<name>, v.<name>
      trainer_state.json       the step, the batch sampler's RNG state, best val loss, the training
                               settings (whatever the trainer passes), and the optimizer's step count
    and, written last:
      manifest.json            the byte count and sha256 of every other file of this save

  A training run keeps its checkpoints in a run folder (gptcore train --out RUN):

      RUN/latest                       the newest checkpoint's folder, then the older ones kept, one
                                       per line ("checkpoints/step-000500")
      RUN/checkpoints/step-000500/     one checkpoint folder per save, the last K of them
      RUN/metrics.jsonl, RUN/loss.png  (gptcore.train)

  save_checkpoint(folder, ...) writes one checkpoint folder in place (a model to share);
  save_run_checkpoint(run, ...) adds a checkpoint to a run folder. Every loading function takes either
  a run folder (and follows RUN/latest) or a checkpoint folder, including the flat folders older
  gptcore versions wrote (the same five files directly in RUN, no manifest): checkpoint_folder(path)
  says which folder a path means. load_model(folder) -> (model, tokenizer) is all generation and
  evaluation need; load_training_state(folder, model, optimizer) fills a model and an optimizer in
  place and returns the trainer's state, so a resumed run continues exactly where the saved one
  stopped. read_training_settings(folder) reads the settings alone (trainer_state.json's "config").

  So a checkpoint is a Hugging Face model folder: transformers' GPT2LMHeadModel.from_pretrained(DIR)
  and AutoTokenizer.from_pretrained(DIR) open it. And the other way round, load_model reads a folder
  transformers wrote or `huggingface-cli download gpt2` fetched (gptcore.huggingface says what it
  accepts): the tensor names with or without "transformer.", the causal-mask buffers skipped,
  lm_head.weight absent or equal to wte.weight (refused otherwise: gptcore ties them), float16 and
  bfloat16 files converted to float32 with a note, the tokenizer from tokenizer.json or from
  vocab.json + merges.txt. Checkpoints of older gptcore versions ("model_type": "gptcore-gpt2",
  gptcore's field names, a {"type": "char"} tokenizer.json) load too.

  Loading never unpickles anything. Tensors come from safetensors (a JSON header of names, dtypes,
  shapes and offsets, then raw little-endian bytes) and everything else from JSON, so a checkpoint
  from someone else can at worst fail to load: it cannot run code (torch.load's pickles can).

HOW (a save that is killed at any moment: the run folder)
  A checkpoint is six files, and no filesystem replaces six files at once. So a run never writes into
  a checkpoint anybody reads. save_run_checkpoint writes the whole set into a new hidden folder,
  RUN/checkpoints/.tmp-<random>, fsyncs every file and the folder, renames it to step-000500 (one
  atomic rename; fsync'd into checkpoints/), and only then switches RUN/latest to it with
  gptcore.files.atomic_write, the one atomic operation that makes the new checkpoint the current one.
  A kill before that switch leaves RUN/latest naming the previous checkpoint, which nothing has
  touched; a kill after it leaves the new one current and complete. Only then are the checkpoints
  beyond the newest K deleted (keep=2 by default: the one before is there if the newest turns out to
  be bad), together with whatever an earlier killed save left in checkpoints/ (hidden .tmp- folders,
  a renamed folder RUN/latest never named). A second process saving into the same run would break
  all this; gptcore.train locks the run folder.

HOW (a damaged file)
  manifest.json records each file's sha256, and loading checks every file it reads against it:
  flipped bits, a truncation, a file from another save, all refused with the file's name. A folder
  without manifest.json (older gptcore, or written by hand) loads without that check. Either way,
  every tensor must be finite (a NaN weight is refused by name), every size in config.json is
  bounded and the model's memory estimated against the machine's before anything is allocated, and
  every JSON file is read with a size limit, its nesting depth error caught, and each field's type
  and range checked: a broken or hostile file is one GptcoreError naming the file and the field.

  save_checkpoint, in place, replaces the files one by one (each atomically, manifest.json last), so
  a save killed between two files leaves files that do not match the old manifest: that folder is
  refused as inconsistent, not loaded wrong. The .safetensors files also carry a random id of their
  save (and model.safetensors the config and a hash of the vocabulary), compared on load: the check
  older flat checkpoints rely on, having no manifest.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import uuid

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_tensors_to_bytes

from gptcore import huggingface
from gptcore.errors import GptcoreError
from gptcore.files import (atomic_write, fsync_folder, remove_leftover_temp_files, remove_tree,
                           write_new_file)
from gptcore.model import GPT, GPTConfig, parameter_shapes
from gptcore.tokenizer import TOKENIZER_CONFIG_FILE, BPETokenizer, CharTokenizer, load_tokenizer

MODEL_TYPE = huggingface.MODEL_TYPE            # "gpt2", what config.json says
OLD_MODEL_TYPE = "gptcore-gpt2"                 # what older gptcore checkpoints' config.json says
CONFIG, MODEL, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
TOKENIZER_CONFIG = TOKENIZER_CONFIG_FILE
OPTIMIZER, TRAINER_STATE, MANIFEST = "optimizer.safetensors", "trainer_state.json", "manifest.json"
# in the order we write them
CHECKPOINT_FILES = (TOKENIZER, TOKENIZER_CONFIG, CONFIG, MODEL, OPTIMIZER, TRAINER_STATE)
LATEST, CHECKPOINTS = "latest", "checkpoints"       # in a run folder: the pointer, and the folders
KEEP_CHECKPOINTS = 2                                # a run keeps its newest this many checkpoints

# the keys save_checkpoint adds to the trainer's dict in trainer_state.json (and load removes again)
_SAVE_ID, _OPTIMIZER_META = "checkpoint_id", "optimizer_meta"
# the string metadata in the .safetensors headers
_META_SAVE_ID, _META_STEP = "gptcore_checkpoint_id", "gptcore_step"
_META_CONFIG, _META_VOCAB = "gptcore_config", "gptcore_vocab_sha256"
_MANIFEST_FORMAT = "gptcore-checkpoint-manifest"

# Limits on what loading reads, so that a hostile file costs an error, not the machine's memory.
# A JSON file is read whole: these are far above what gptcore writes (a trainer_state.json is a few
# kB, a character vocabulary a few kB; a BPE vocabulary some MB).
_MAX_JSON_BYTES = {CONFIG: 1 << 20, MANIFEST: 1 << 20, TRAINER_STATE: 16 << 20, TOKENIZER: 256 << 20}
# the float formats a model.safetensors from elsewhere may hold, converted to float32 on load
_HALF_DTYPES = {"F16": "float16", "BF16": "bfloat16"}
_MAX_POINTER_BYTES = 1 << 16
MAX_DIMENSION = huggingface.MAX_DIMENSION    # every GPTConfig size: the kernels take them as C ints
MAX_STEP = 2 ** 53                   # steps and step counts: exactly representable as a float
# a checkpoint folder in a run: step-000500, or step-000500.2 for a second save at the same step
_CHECKPOINT_NAME = re.compile(r"step-[0-9]{1,20}(\.[0-9]{1,6})?")
_TEMP_PREFIX = ".tmp-"


# ----------------------------------------------------------------------------------------------------
# Serializing: every file of a save, as bytes, before anything is written
# ----------------------------------------------------------------------------------------------------

def _config_dict(config):
    return {field.name: int(getattr(config, field.name)) for field in dataclasses.fields(GPTConfig)}


def _vocab_hash(tokenizer):
    """A hash of the vocabulary itself (not of the file's bytes, which may be reformatted by hand)."""
    return tokenizer.vocab_hash()


def _tokenizer_files(tokenizer, block_size):
    """The tokenizer's files in a checkpoint, {name: bytes}: more entries of the set, listed in
    the manifest and checked like the others."""
    return {TOKENIZER: tokenizer.to_json().encode("utf-8"),
            TOKENIZER_CONFIG: (json.dumps(tokenizer.tokenizer_config(block_size), indent=2) + "\n").encode("utf-8")}


def _load_tokenizer(folder, manifest):
    """tokenizer.json; in a folder without a manifest (Hugging Face's) that has none, vocab.json
    and merges.txt, GPT-2's original pair."""
    if manifest is None and not os.path.lexists(os.path.join(folder, TOKENIZER)):
        return load_tokenizer(folder)       # vocab.json + merges.txt, or one line saying neither is there
    path = _verified_path(folder, TOKENIZER, manifest)
    _check_size(path, _MAX_JSON_BYTES[TOKENIZER])
    try:
        return load_tokenizer(path)
    except RecursionError:
        raise GptcoreError(f"tokenizer file {path} is nested too deeply to be a tokenizer") from None


def _nonfinite_tensor(tensors):
    """The name of the first tensor (in order) that holds a NaN or an inf, else None."""
    return next((name for name, array in tensors.items() if not np.isfinite(array).all()), None)


def _manifest_bytes(files, step):
    entries = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
               for name, data in files.items()}
    return (json.dumps({"format": _MANIFEST_FORMAT, "step": step, "files": entries}, indent=2)
            + "\n").encode("utf-8")


def checkpoint_files(model, tokenizer, optimizer=None, trainer_state=None):
    """Every file of a checkpoint, {name: bytes} in the order they are written, manifest.json last.
    Raises before anything is written: TypeError/ValueError for arguments that cannot be saved
    (a trainer_state JSON cannot hold, a tensor that holds NaN or inf)."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a gptcore GPT, got {type(model).__name__}")
    if not isinstance(tokenizer, (CharTokenizer, BPETokenizer)):
        raise TypeError(f"tokenizer must be a CharTokenizer or a BPETokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} {tokenizer.unit}s but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    if (optimizer is None) != (trainer_state is None):
        raise ValueError("pass optimizer and trainer_state together (a run to resume) or neither (a model)")
    save_id = uuid.uuid4().hex
    step = None
    params = {name: model.params[name] for name, _ in parameter_shapes(model.config)}
    bad = _nonfinite_tensor(params)
    if bad is not None:
        raise ValueError(f"parameter {bad!r} holds NaN or inf: a diverged model is not saved")
    if trainer_state is not None:
        if not isinstance(trainer_state, dict):
            raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
        step = trainer_state.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= MAX_STEP:
            raise ValueError(f'trainer_state["step"] must be an integer in [0, {MAX_STEP}], got {step!r}')
        step = int(step)
        for key in (_SAVE_ID, _OPTIMIZER_META):
            if key in trainer_state:
                raise ValueError(f"trainer_state must not use the key {key!r}: save_checkpoint writes it")
        optimizer_arrays, optimizer_meta = optimizer.state_dict()
        optimizer_arrays = {name: np.ascontiguousarray(a) for name, a in optimizer_arrays.items()}
        bad = _nonfinite_tensor(optimizer_arrays)
        if bad is not None:
            raise ValueError(f"optimizer state {bad!r} holds NaN or inf: a diverged run is not saved")
        trainer_json = json.dumps({**trainer_state, _SAVE_ID: save_id, _OPTIMIZER_META: optimizer_meta},
                                  indent=2) + "\n"
    config = _config_dict(model.config)
    metadata = {"format": "np", _META_SAVE_ID: save_id, _META_STEP: "" if step is None else str(step)}
    # "format": "pt" for the weights: transformers 4.x opens only files that say pt, tf, flax or mlx;
    # the bytes are plain little-endian float32 whatever the label, and numpy reads them as well
    model_metadata = {**metadata, "format": "pt", _META_CONFIG: json.dumps(config, sort_keys=True),
                      _META_VOCAB: _vocab_hash(tokenizer)}
    hf_config = huggingface.config_dict(model.config, tokenizer)
    # safetensors' own save_file renames its own temporary file into place, without an fsync and
    # with mode 0600; we serialize to bytes and write those ourselves (one in-memory copy).
    files = {**_tokenizer_files(tokenizer, model.config.block_size),
             CONFIG: (json.dumps(hf_config, indent=2) + "\n").encode("utf-8"),
             MODEL: save_tensors_to_bytes(params, metadata=model_metadata)}
    if trainer_state is not None:
        files[OPTIMIZER] = save_tensors_to_bytes(optimizer_arrays, metadata=metadata)
        files[TRAINER_STATE] = trainer_json.encode("utf-8")      # last: it names the step
    files[MANIFEST] = _manifest_bytes(files, step)
    return files


# ----------------------------------------------------------------------------------------------------
# Saving: one checkpoint folder in place, or a new checkpoint in a run folder
# ----------------------------------------------------------------------------------------------------

def save_checkpoint(folder, model, tokenizer, optimizer=None, trainer_state=None):
    """Write `model` and `tokenizer` (and, to resume training, `optimizer` and `trainer_state`) into
    `folder`, creating it if needed: each file replaced atomically, manifest.json last (see the
    module docstring; a training run uses save_run_checkpoint, which switches the whole set at once).

    trainer_state: a JSON-serializable dict with at least "step" (int); it comes back unchanged from
    load_training_state. A save without optimizer and trainer_state (a model to share) deletes any
    optimizer.safetensors and trainer_state.json left from an earlier save, since they would no longer
    match the weights."""
    files = checkpoint_files(model, tokenizer, optimizer, trainer_state)
    os.makedirs(folder, exist_ok=True)
    remove_leftover_temp_files(folder, (*CHECKPOINT_FILES, MANIFEST))
    for name, data in files.items():
        atomic_write(os.path.join(folder, name), data)
    if optimizer is None:
        for name in (TRAINER_STATE, OPTIMIZER):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))


def _pointer_lines(run_folder):
    """The checkpoint folder names RUN/latest lists, newest first, or [] if there is no RUN/latest."""
    path = os.path.join(run_folder, LATEST)
    if not os.path.lexists(path):
        return []
    _check_size(path, _MAX_POINTER_BYTES)
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8").split()
    except OSError as e:
        raise GptcoreError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise GptcoreError(f"{path} is damaged: it is not UTF-8 text") from None
    names = []
    for line in lines:
        prefix, _, name = line.partition("/")
        if prefix != CHECKPOINTS or not _CHECKPOINT_NAME.fullmatch(name):
            raise GptcoreError(f"{path} is damaged: {line[:80]!r} is not a checkpoint folder "
                               f"({CHECKPOINTS}/step-N); the checkpoints are in "
                               f"{os.path.join(run_folder, CHECKPOINTS)}")
        names.append(name)
    if not names:
        raise GptcoreError(f"{path} is empty: it names no checkpoint")
    return names


def save_run_checkpoint(run_folder, model, tokenizer, optimizer, trainer_state, keep=KEEP_CHECKPOINTS,
                        replace=False):
    """Add a checkpoint to the run folder `run_folder` and make it the current one (RUN/latest), then
    delete all but the newest `keep` (all but the new one if `replace`: a new run over an old one). A crash at any moment leaves RUN/latest naming a complete
    checkpoint (see the module docstring). Returns the new checkpoint's folder. Raises OSError when
    the disk refuses (full, read-only): then nothing that was there before is changed, and nothing
    of this save is left behind."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    files = checkpoint_files(model, tokenizer, optimizer, trainer_state)
    kept = _pointer_lines(run_folder)
    folder = os.path.join(run_folder, CHECKPOINTS)
    os.makedirs(folder, exist_ok=True)
    # what a save killed before its rename left behind: a hidden folder, a temporary RUN/latest
    for entry in os.listdir(folder):
        if entry.startswith(_TEMP_PREFIX):
            remove_tree(os.path.join(folder, entry))
    remove_leftover_temp_files(run_folder, (LATEST,))
    name = f"step-{trainer_state['step']:06d}"
    taken = set(os.listdir(folder)) | set(kept)
    if name in taken:                         # a second save at the same step
        name = next(f"{name}.{i}" for i in range(2, 10 ** 6) if f"{name}.{i}" not in taken)
    temporary = os.path.join(folder, f"{_TEMP_PREFIX}{uuid.uuid4().hex[:12]}")
    final = os.path.join(folder, name)
    try:
        os.mkdir(temporary)
        for file_name, data in files.items():
            write_new_file(os.path.join(temporary, file_name), data)
        fsync_folder(temporary)
        os.rename(temporary, final)
        fsync_folder(folder)
    except BaseException:
        remove_tree(temporary)
        raise
    kept = [name] + ([] if replace else [old for old in kept if old != name][:keep - 1])
    try:
        # the commit: from here on, the new checkpoint is the run's
        atomic_write(os.path.join(run_folder, LATEST),
                     "".join(f"{CHECKPOINTS}/{entry}\n" for entry in kept).encode("utf-8"))
    except BaseException:
        remove_tree(final)                    # never became current; the old pointer stands
        raise
    for entry in os.listdir(folder):
        if _CHECKPOINT_NAME.fullmatch(entry) and entry not in kept:
            remove_tree(os.path.join(folder, entry))
    return final


# ----------------------------------------------------------------------------------------------------
# Loading: every check raises GptcoreError with one line naming the file and what is wrong with it
# ----------------------------------------------------------------------------------------------------

def _one_line(error):
    return " ".join(str(error).split())


def _check_folder(folder):
    if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
        raise GptcoreError("the checkpoint folder must be a non-empty path")
    if not os.path.exists(folder):
        raise GptcoreError(f"checkpoint folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise GptcoreError(f"checkpoint {folder} is not a folder (a checkpoint is a folder holding "
                           f"{CONFIG}, {MODEL} and {TOKENIZER}, or a run folder holding {LATEST})")
    return folder


def checkpoint_folder(folder):
    """The checkpoint folder a path means: for a run folder (one holding RUN/latest), the newest
    checkpoint it names; for anything else, the path itself. Raises GptcoreError."""
    _check_folder(folder)
    names = _pointer_lines(folder)
    if not names:
        return folder
    path = os.path.join(folder, CHECKPOINTS, names[0])
    if not os.path.isdir(path):
        raise GptcoreError(f"{os.path.join(folder, LATEST)} names {CHECKPOINTS}/{names[0]}, which does "
                           f"not exist")
    return path


def run_checkpoints(run_folder):
    """The checkpoint folders of a run, newest first, as RUN/latest lists them ([] for none)."""
    try:
        return [os.path.join(run_folder, CHECKPOINTS, name) for name in _pointer_lines(run_folder)]
    except GptcoreError:
        return []


def _require(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise GptcoreError(f"checkpoint {folder} has no {name}")
    return path


def _check_size(path, limit):
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise GptcoreError(f"cannot read {path}: {e.strerror or e}") from None
    if size > limit:
        raise GptcoreError(f"{path} is {size:,} bytes, more than the {limit:,} such a file may hold")


def _sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(folder):
    """manifest.json -> {name: (bytes, sha256)}, or None for a folder without one (older gptcore,
    or files from elsewhere: loaded without checksums)."""
    if not os.path.lexists(os.path.join(folder, MANIFEST)):
        return None
    path, data = _read_json(folder, MANIFEST, None)
    entries = data.get("files")
    if data.get("format") != _MANIFEST_FORMAT or not isinstance(entries, dict) or len(entries) > 64:
        raise GptcoreError(f'{path} is not a gptcore manifest (needs "format": "{_MANIFEST_FORMAT}" and '
                           f'a "files" object)')
    manifest = {}
    for name, entry in entries.items():
        size = entry.get("bytes") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if os.path.basename(name) != name or name in ("", ".", "..") or isinstance(size, bool) \
                or not isinstance(size, int) or size < 0 or not isinstance(digest, str) \
                or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise GptcoreError(f'{path}: "files" entry {name[:80]!r} needs a plain file name, an integer '
                               f'"bytes" >= 0 and a hex "sha256"')
        manifest[name] = (size, digest)
    return manifest


def _verified_path(folder, name, manifest):
    """folder/name, checked against the manifest (if there is one): listed, same size, same sha256."""
    path = _require(folder, name)
    if manifest is None:
        return path
    if name not in manifest:
        raise GptcoreError(f"checkpoint {folder} is inconsistent: {name} is not one of the files "
                           f"{MANIFEST} lists (it is from another save)")
    size, digest = manifest[name]
    try:
        actual_size = os.path.getsize(path)
        actual = _sha256_of_file(path) if actual_size == size else None
    except OSError as e:
        raise GptcoreError(f"cannot read {path}: {e.strerror or e}") from None
    if actual_size != size:
        raise GptcoreError(f"{path} is {actual_size:,} bytes but {MANIFEST} says {size:,}: the file is "
                           f"truncated, damaged or from another save (checkpoint inconsistent)")
    if actual != digest:
        raise GptcoreError(f"{path} does not match its sha256 in {MANIFEST}: the file is damaged or from "
                           f"another save (checkpoint inconsistent)")
    return path


def _read_json(folder, name, manifest):
    path = _verified_path(folder, name, manifest)
    _check_size(path, _MAX_JSON_BYTES[name])
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise GptcoreError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise GptcoreError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise GptcoreError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise GptcoreError(f"{path} is nested too deeply to be a {name}") from None
    if not isinstance(data, dict):
        raise GptcoreError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return path, data


def _available_memory():
    """Bytes of memory this process could still get (Linux's MemAvailable), or None if unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def parameter_count(config):
    """The number of parameters of a GPT with this config (the sum over parameter_shapes), computed
    without building the list, so that it is safe for any sizes."""
    V, T, C, L = config.vocab_size, config.block_size, config.n_embd, config.n_layer
    return V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


def _check_memory(path, config):
    """A model's parameters, their gradients and the loaded copy: 3 float32 per parameter. Refused
    before any allocation if the machine does not have that much memory available."""
    count = parameter_count(config)
    needed, available = 3 * 4 * count, _available_memory()
    if available is not None and needed > available:
        raise GptcoreError(f"{path} describes a model of {count:,} parameters, which needs about "
                           f"{needed / 2**30:,.1f} GiB of memory to load; this machine has "
                           f"{available / 2**30:,.1f} GiB available")


def _read_config(folder, manifest):
    """config.json -> GPTConfig: Hugging Face's GPT-2 keys (gptcore's checkpoints, and folders
    transformers wrote; gptcore.huggingface.read_config), or an older gptcore checkpoint's own."""
    path, data = _read_json(folder, CONFIG, manifest)
    if "model_type" not in data:
        raise GptcoreError(f'{path} has no "model_type" field (expected "{MODEL_TYPE}")')
    if data["model_type"] == MODEL_TYPE:
        config = huggingface.read_config(path, data)
    elif data["model_type"] == OLD_MODEL_TYPE:
        config = _read_old_config(path, data)
    else:
        raise GptcoreError(f'{path} has "model_type": {str(data["model_type"])[:80]!r}; gptcore loads only '
                           f'GPT-2 ("{MODEL_TYPE}", as Hugging Face writes it) and its own older '
                           f'"{OLD_MODEL_TYPE}" checkpoints')
    _check_memory(path, config)
    return config


def _read_old_config(path, data):
    """An older gptcore checkpoint's config.json: the GPTConfig fields under their own names."""
    values = {}
    # fields other than these (and model_type) are ignored
    for field in dataclasses.fields(GPTConfig):
        if field.name not in data:
            raise GptcoreError(f'{path} has no "{field.name}" field')
        value = data[field.name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIMENSION:
            raise GptcoreError(f'{path}: "{field.name}" must be an integer in [1, {MAX_DIMENSION}], got '
                               f'{value!r:.80}')
        values[field.name] = value
    try:
        return GPTConfig(**values)
    except ValueError as e:
        raise GptcoreError(f"{path}: {e}") from None


def _bfloat16_as_float32(path, key):
    """One bfloat16 tensor of a .safetensors file, as float32. numpy has no bfloat16, so we read the
    raw bytes where the header puts them: a bfloat16 is the top 16 bits of a float32, so shifting
    each one 16 bits up gives that float32 exactly."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if not 0 < header_size <= _MAX_JSON_BYTES[CONFIG] * 100:
            raise ValueError(f"header of {header_size} bytes")
        entry = json.loads(f.read(header_size))[key]
        begin, end = entry["data_offsets"]
        f.seek(8 + header_size + begin)
        raw = np.frombuffer(f.read(end - begin), "<u2")
    if raw.size != math.prod(entry["shape"]):
        raise ValueError(f"tensor {key!r} is cut short")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def _read_tensors(folder, name, expected, manifest, model_names=False):
    """Open a .safetensors file and check it holds exactly the finite float32 tensors in `expected`,
    an ordered list of (name, shape). Returns ({name: array}, string metadata, notes for the user).
    model_names=True reads a model.safetensors the way transformers writes it too
    (gptcore.huggingface.model_names): names with or without "transformer.", the mask buffers
    skipped, lm_head.weight only if it equals wte.weight, float16 and bfloat16 converted to float32
    (with a note)."""
    path = _verified_path(folder, name, manifest)
    notes, converted = [], {}
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            if model_names:
                in_file, lm_head = huggingface.model_names(f.keys(), path)
            else:
                in_file, lm_head = {key: key for key in f.keys()}, None
            wanted = dict(expected)
            missing = [key for key, _ in expected if key not in in_file]
            if missing:
                raise GptcoreError(f"{path} has no tensor {missing[0]!r} (expected shape {wanted[missing[0]]})"
                                   + (f"; {len(missing)} tensors are missing" if len(missing) > 1 else ""))
            unexpected = sorted(in_file[key] for key in set(in_file) - set(wanted))
            if unexpected:
                raise GptcoreError(f"{path} has an unexpected tensor {unexpected[0]!r} that the model in "
                                   f"{CONFIG} does not have" + (f" ({len(unexpected)} in all)"
                                                                if len(unexpected) > 1 else ""))
            tensors = {}
            reading = list(expected) + ([(huggingface.LM_HEAD, wanted["wte.weight"])] if lm_head else [])
            for key, shape in reading:
                stored = lm_head if key == huggingface.LM_HEAD else in_file[key]
                view = f.get_slice(stored)
                got_shape, got_dtype = tuple(view.get_shape()), view.get_dtype()
                if got_shape != tuple(shape):
                    raise GptcoreError(f"tensor {stored!r} in {path} has shape {got_shape}, expected "
                                       f"{tuple(shape)} for the model in {CONFIG}")
                if got_dtype == "F32":
                    tensors[key] = f.get_tensor(stored)
                elif model_names and got_dtype == "F16":
                    tensors[key] = f.get_tensor(stored).astype(np.float32)
                elif model_names and got_dtype == "BF16":
                    tensors[key] = _bfloat16_as_float32(path, stored)
                else:
                    accepted = "F32 (float32)" + (", F16 or BF16" if model_names else "")
                    raise GptcoreError(f"tensor {stored!r} in {path} has dtype {got_dtype}, expected {accepted}")
                if got_dtype != "F32":
                    converted[got_dtype] = converted.get(got_dtype, 0) + 1
                if not np.isfinite(tensors[key]).all():
                    bad = int(np.count_nonzero(~np.isfinite(tensors[key])))
                    raise GptcoreError(f"tensor {stored!r} in {path} holds {bad:,} NaN or inf values: the run "
                                       f"diverged before this save, or the file is damaged")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise GptcoreError(f"{path} is truncated or corrupted: {_one_line(e)}") from None
    if lm_head is not None:
        head = tensors.pop(huggingface.LM_HEAD)
        if not np.array_equal(head, tensors["wte.weight"]):
            raise GptcoreError(f"{path}: {lm_head!r} differs from the token embedding wte.weight; gptcore's GPT-2 "
                               f"ties the LM head to wte (as GPT-2 does) and will not replace a separate head")
    for dtype, count in converted.items():
        notes.append(f"note: {path}: converted {count} {_HALF_DTYPES[dtype]} tensors to float32")
    return tensors, metadata, notes


def _load_model_files(folder):
    """config.json, the tokenizer and model.safetensors, checked each alone and against each other."""
    if not os.path.lexists(os.path.join(folder, MODEL)):
        huggingface.refuse_other_weights(folder)    # pytorch_model.bin alone: one line on what to do
    manifest = _read_manifest(folder)
    config = _read_config(folder, manifest)
    tokenizer = _load_tokenizer(folder, manifest)
    if tokenizer.vocab_size != config.vocab_size:
        raise GptcoreError(f"checkpoint {folder} is inconsistent: {CONFIG} has vocab_size="
                           f"{config.vocab_size} but {TOKENIZER} has {tokenizer.vocab_size} {tokenizer.unit}s")
    tensors, metadata, notes = _read_tensors(folder, MODEL, parameter_shapes(config), manifest, model_names=True)
    # A file from outside gptcore may carry none of our metadata; then the shape checks above are all
    # we can do. Ours always does, and a mismatch means the files come from different saves.
    if _META_CONFIG in metadata and metadata[_META_CONFIG] != json.dumps(_config_dict(config), sort_keys=True):
        raise GptcoreError(f"checkpoint {folder} is inconsistent: {CONFIG} is not the config "
                           f"{MODEL} was saved with ({metadata[_META_CONFIG][:200]}); was a save interrupted?")
    if _META_VOCAB in metadata and metadata[_META_VOCAB] != _vocab_hash(tokenizer):
        raise GptcoreError(f"checkpoint {folder} is inconsistent: {TOKENIZER} is not the vocabulary "
                           f"{MODEL} was saved with; was a save interrupted?")
    return manifest, config, tokenizer, tensors, metadata, notes


def load_model(folder, backend=None, block_size=None, log=None):
    """A checkpoint, run or Hugging Face GPT-2 folder -> (GPT with the saved weights, its tokenizer).
    block_size (at most the saved one) crops the model's context to its first block_size positions,
    as nanoGPT's crop_block_size does: wpe keeps its first block_size rows, nothing else depends on
    the context length. Notes (a float16 file converted) go to `log` (default: stderr). Raises
    GptcoreError."""
    _, config, tokenizer, tensors, _, notes = _load_model_files(checkpoint_folder(folder))
    for note in notes:
        (log or _print_to_stderr)(note)
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= config.block_size:
            raise GptcoreError(f"block_size must be an integer in [1, {config.block_size}] (the model in {folder} "
                               f"has {config.block_size} positions), got {block_size!r}")
        config = dataclasses.replace(config, block_size=block_size)
        tensors["wpe.weight"] = tensors["wpe.weight"][:block_size]
    model = GPT(config, backend=backend)
    for name, value in tensors.items():
        model.params[name][...] = value
    return model, tokenizer


def read_model_config(folder):
    """The GPTConfig of the model in a checkpoint, run or Hugging Face folder, read without its
    tensors. Raises GptcoreError."""
    folder = checkpoint_folder(folder)
    return _read_config(folder, _read_manifest(folder))


def _print_to_stderr(line):
    print(line, file=sys.stderr)


def read_training_settings(folder):
    """The training settings saved with the run in `folder` (a run or checkpoint folder):
    trainer_state.json's "config" dict (the gptcore.train.TrainConfig fields), read without loading
    any tensor. Raises GptcoreError."""
    folder = checkpoint_folder(folder)
    path, state = _read_json(folder, TRAINER_STATE, _read_manifest(folder))
    settings = state.get("config")
    if not isinstance(settings, dict):
        raise GptcoreError(f'{path} has no "config" object: it holds no training settings to resume with')
    return settings


def _integer_field(path, state, key, low, high, where=""):
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise GptcoreError(f'{path}: "{where}{key}" must be an integer in [{low}, {high}], got '
                           f'{"nothing" if key not in state else format(repr(value), ".80")}')
    return value


def load_training_state(folder, model, optimizer):
    """Resume: fill model.params and the optimizer's state in place from `folder` (a run or checkpoint
    folder); return the trainer state dict exactly as it was passed to save_checkpoint. Nothing is
    changed unless every file checks out. Raises GptcoreError."""
    folder = checkpoint_folder(folder)
    manifest, config, _, tensors, model_meta, _ = _load_model_files(folder)
    for field, value in _config_dict(config).items():
        if getattr(model.config, field) != value:
            raise GptcoreError(f"checkpoint {folder} holds a model with {field}={value}, but the model "
                               f"to resume has {field}={getattr(model.config, field)}")
    path, state = _read_json(folder, TRAINER_STATE, manifest)
    step = _integer_field(path, state, "step", 0, MAX_STEP)
    save_id, optimizer_meta = state.get(_SAVE_ID), state.get(_OPTIMIZER_META)
    if not isinstance(save_id, str) or not isinstance(optimizer_meta, dict):
        raise GptcoreError(f'{path} needs a "{_SAVE_ID}" string and an "{_OPTIMIZER_META}" object; it was '
                           f'not written by save_checkpoint')
    _integer_field(path, optimizer_meta, "step_count", 0, MAX_STEP, where=f"{_OPTIMIZER_META}.")
    optimizer_arrays, _ = optimizer.state_dict()
    expected = [(name, tuple(np.shape(a))) for name, a in optimizer_arrays.items()]
    optimizer_tensors, optimizer_meta_strings, _ = _read_tensors(folder, OPTIMIZER, expected, manifest)
    # the consistency check: the three files of a resumable checkpoint must come from one save
    for name, meta in ((MODEL, model_meta), (OPTIMIZER, optimizer_meta_strings)):
        if meta.get(_META_SAVE_ID) != save_id:
            raise GptcoreError(f"checkpoint {folder} is inconsistent: {TRAINER_STATE} is from step {step} "
                               f"but {name} is from step {meta.get(_META_STEP) or '(none)'} of another "
                               f"save (a save was interrupted between files); resume from another checkpoint")
    # every check passed: now, and only now, change the model and the optimizer
    for name, value in tensors.items():
        model.params[name][...] = value
    optimizer.load_state_dict(optimizer_tensors, optimizer_meta)
    return {key: value for key, value in state.items() if key not in (_SAVE_ID, _OPTIMIZER_META)}
