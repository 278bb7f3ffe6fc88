"""gptcore.data: the training text, its split into train and validation, and the batches drawn from it.

WHAT'S GOING ON HERE
====================

WHAT
  1. read_corpus: gather text. With no path it is the running Python's own standard library source
     (every *.py under sysconfig's "stdlib" folder, site-packages left out): a few tens of millions
     of characters that every machine with Python already has, so training needs no download.
     A file path reads that file; a folder reads the files matching a glob, at any depth.
  2. split_tokens: the first 90% of the token stream trains, the last 10% validates, as nanoGPT
     splits shakespeare_char (n = int(0.9 * len)). A contiguous split, not a shuffled one: windows
     drawn from the training part can never overlap the validation text.
  3. BatchSampler: each training step takes B random windows of T + 1 consecutive tokens; the input
     x is the first T, the target y the last T (the same window shifted by one), so every position t
     learns to predict token t + 1 from the tokens up to t.
  4. eval_windows: the validation stream cut into consecutive, non-overlapping windows, so an
     evaluation is deterministic and scores each token once.

HOW (determinism)
  Files are read in sorted order of their path, so the same folder always gives the same text.
  The sampler's randomness is one numpy Generator (PCG64) seeded by the caller; its state() is the
  generator's whole state as a JSON-ready dict, and set_state() restores it, so a run resumed from
  a checkpoint draws exactly the batches the uninterrupted run would have drawn.

HOW (text)
  Files are decoded as UTF-8 ("utf-8-sig": a leading byte-order mark is dropped, it is not text) and
  newlines are normalized as Python's open() does in text mode ("\\r\\n" and "\\r" become "\\n"), so a
  file saved on Windows does not add "\\r" to the vocabulary. A file holding a NUL byte is binary and
  one that does not decode is not UTF-8: in a folder both are skipped and counted, a single file
  named on its own is an error. Non-empty files are joined with one "\\n".
"""
import fnmatch
import os
import sysconfig
from dataclasses import dataclass, field

import numpy as np

from gptcore.errors import GptcoreError

# folders under the stdlib that are not the standard library: third-party packages, bytecode
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


# ----------------------------------------------------------------------------------------------------
# 1. Reading the corpus
# ----------------------------------------------------------------------------------------------------

@dataclass
class CorpusReport:
    source: str                 # what was read, for humans: "the Python 3.11 standard library at ..."
    files_read: int = 0         # files whose text is in the corpus (empty files count, adding nothing)
    files_skipped: int = 0      # binary, not UTF-8, or unreadable
    characters: int = 0         # len(text)
    skipped: list = field(default_factory=list)    # (path, reason) for each skipped file or folder

    def __str__(self):
        skipped = f", skipped {self.files_skipped} (binary, not UTF-8 or unreadable)" if self.files_skipped else ""
        return f"read {self.files_read} files{skipped}: {self.characters:,} characters from {self.source}"


class _NotText(Exception):
    """Why one file's bytes are not usable text; read_corpus turns it into a skip or a GptcoreError."""


def _decode(raw):
    if b"\0" in raw:
        raise _NotText("binary (contains NUL bytes)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _NotText(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _matching_files(root, glob, prune):
    """Files under `root` whose name matches `glob`, sorted by their path relative to root; and the
    folders that could not be listed. os.walk does not follow symbolic links to folders (no loops)."""
    found, unreadable = [], []
    for folder, subfolders, names in os.walk(root, onerror=lambda e: unreadable.append(e)):
        subfolders[:] = [d for d in subfolders if d not in prune]
        found += [os.path.join(folder, n) for n in names
                  if fnmatch.fnmatchcase(n, glob) and os.path.isfile(os.path.join(folder, n))]
    return sorted(found, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/")), unreadable


def read_corpus(path=None, glob="*.py"):
    """-> (text, CorpusReport). path None: the Python standard library's source; a file: that file;
    a folder: every file below it whose *name* matches `glob` (fnmatch: "*.py", "*.txt", "*"), read
    in sorted order of path. Raises GptcoreError with one line for anything unusable."""
    if path is None:
        root = sysconfig.get_paths()["stdlib"]
        version = sysconfig.get_python_version()
        source, prune = f"the Python {version} standard library at {root}", _NOT_STDLIB
        if not os.path.isdir(root):
            raise GptcoreError(f"this Python has no standard library source folder ({root} does not "
                               f"exist); pass a corpus path instead")
    else:
        root, source, prune = os.fspath(path), os.fspath(path), set()
        if not os.path.exists(root):
            raise GptcoreError(f"corpus path {root} does not exist")
    if "/" in glob or os.sep in glob:
        raise GptcoreError(f"glob {glob!r} must match file names (like '*.txt'), not paths; "
                           f"folders are searched at every depth anyway")

    if os.path.isfile(root):
        # one file, named by the user: anything wrong with it is an error, not a skip
        try:
            with open(root, "rb") as f:
                text = _decode(f.read())
        except OSError as e:
            raise GptcoreError(f"cannot read corpus file {root}: {e.strerror or e}") from None
        except _NotText as e:
            raise GptcoreError(f"corpus file {root} is {e}") from None
        if not text:
            raise GptcoreError(f"corpus file {root} is empty")
        return text, CorpusReport(source=source, files_read=1, characters=len(text))
    if not os.path.isdir(root):
        raise GptcoreError(f"corpus path {root} is neither a regular file nor a folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise GptcoreError(f"cannot read corpus folder {root}: permission denied")

    paths, unreadable = _matching_files(root, glob, prune)
    if not paths:
        raise GptcoreError(f"no files matching {glob!r} in {source}")
    report = CorpusReport(source=source)
    report.skipped += [(e.filename, f"unreadable folder: {e.strerror}") for e in unreadable]
    parts = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                text = _decode(f.read())
        except OSError as e:
            report.skipped.append((p, f"unreadable: {e.strerror or e}"))
            continue
        except _NotText as e:
            report.skipped.append((p, str(e)))
            continue
        report.files_read += 1
        if text:
            parts.append(text)
    report.files_skipped = len(report.skipped)
    text = "\n".join(parts)
    if not text:
        raise GptcoreError(f"the corpus is empty: the {len(paths)} files matching {glob!r} in {source} "
                           f"are empty or were skipped ({report.files_skipped} skipped: binary, not "
                           f"UTF-8 or unreadable)")
    report.characters = len(text)
    return text, report


# ----------------------------------------------------------------------------------------------------
# 2. Train / validation split
# ----------------------------------------------------------------------------------------------------

def _check_tokens(tokens):
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be a 1-D numpy array of integer token ids, got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)} {getattr(tokens, 'shape', '')}")
    return tokens


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise GptcoreError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def split_tokens(ids, val_fraction=0.1):
    """ids (N,) -> (train, val): views of the first n = int((1 - val_fraction) * N) tokens and the rest.
    val_fraction=0 gives an empty validation part."""
    ids = _check_tokens(ids)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 <= val_fraction < 1.0:
        raise GptcoreError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    n = int((1.0 - val_fraction) * len(ids))
    return ids[:n], ids[n:]


# ----------------------------------------------------------------------------------------------------
# 3. Training batches
# ----------------------------------------------------------------------------------------------------

class BatchSampler:
    """Random training windows. next_batch() -> x, y: int64 (batch_size, block_size), y[b, t] = x[b, t + 1]
    for t < T - 1, and y[b, T - 1] the token after the window's input.

        sampler = BatchSampler(train_ids, batch_size=16, block_size=64, seed=1337)
        x, y = sampler.next_batch()
        saved = sampler.state()           # JSON-ready; BatchSampler(...).set_state(saved) resumes
    """

    def __init__(self, tokens, batch_size, block_size, seed):
        self.tokens = _check_tokens(tokens)
        self.batch_size = _check_positive("batch_size", batch_size)
        self.block_size = _check_positive("block_size", block_size)
        if len(tokens) < self.block_size + 1:
            raise GptcoreError(f"corpus shorter than one window: {len(tokens)} tokens, need block_size + 1 "
                               f"= {self.block_size + 1}")
        self.rng = np.random.default_rng(seed)
        self._steps = np.arange(self.block_size + 1)          # (T + 1,) offsets within a window

    def next_batch(self):
        B, T = self.batch_size, self.block_size
        # a window starts anywhere in [0, len - T - 1], so its T + 1 tokens all exist
        starts = self.rng.integers(0, len(self.tokens) - T, size=B)          # (B,)
        windows = self.tokens[starts[:, None] + self._steps]                  # (B, T + 1), a copy
        x = np.ascontiguousarray(windows[:, :-1], dtype=np.int64)              # (B, T)
        y = np.ascontiguousarray(windows[:, 1:], dtype=np.int64)               # (B, T)
        return x, y

    def state(self):
        """The generator's whole state, e.g. {"bit_generator": "PCG64", "state": {"state": <128-bit
        int>, "inc": ...}, ...}. JSON holds the big integers exactly (Python's json does)."""
        return self.rng.bit_generator.state

    def set_state(self, state):
        expected = type(self.rng.bit_generator).__name__
        if not isinstance(state, dict) or state.get("bit_generator") != expected:
            raise GptcoreError(f"the saved sampler state is not a {expected} generator state; "
                               f"the checkpoint's trainer_state.json is damaged or from elsewhere")
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as e:    # OverflowError: a negative word
            raise GptcoreError(f"the saved sampler state is invalid: {e}") from None


# ----------------------------------------------------------------------------------------------------
# 4. Evaluation windows
# ----------------------------------------------------------------------------------------------------

class EvalWindows:
    """The complete, non-overlapping windows of a token stream, in batches. Iterate for (x, y), each
    int64 (b, block_size) with b <= batch_size; len() is the number of batches.

    Window i is tokens[i*T : i*T + T + 1] (T = block_size): inputs its first T tokens, targets its
    last T. For tokens = [0 1 2 3 4 5 6 7] and T = 3 the windows are [0 1 2 3] and [3 4 5 6]: targets
    1..6, each once; token 7 has no complete window and is not scored, nor is token 0 (nothing
    predicts the first token). Each window starts with no context, so its first positions predict
    from little, and a loss measured this way is a little higher than the model's loss with full
    context (a sliding window would fix that at T times the cost)."""

    def __init__(self, tokens, block_size, batch_size):
        self.tokens = _check_tokens(tokens)
        self.block_size = _check_positive("block_size", block_size)
        self.batch_size = _check_positive("batch_size", batch_size)
        # windows i with i*T + T + 1 <= len, i.e. i < (len - 1) / T
        self.n_windows = max(0, (len(tokens) - 1) // self.block_size)
        if self.n_windows == 0:
            raise GptcoreError(f"evaluation data shorter than one window: {len(tokens)} tokens, need "
                               f"block_size + 1 = {self.block_size + 1} (use a longer corpus, a larger "
                               f"val_fraction or a smaller block_size)")

    def __len__(self):
        return -(-self.n_windows // self.batch_size)

    def __iter__(self):
        T = self.block_size
        for first in range(0, self.n_windows, self.batch_size):
            last = min(first + self.batch_size, self.n_windows)                # windows [first, last)
            # consecutive windows share one token, so x and y are two shifted views of one stretch
            x = self.tokens[first * T:last * T].reshape(last - first, T)       # (b, T)
            y = self.tokens[first * T + 1:last * T + 1].reshape(last - first, T)
            yield x.astype(np.int64), y.astype(np.int64)                      # copies, the stream stays ours


def eval_windows(tokens, block_size, batch_size=8):
    """The deterministic evaluation batches of `tokens`: see EvalWindows. Checks run now, not at the
    first iteration."""
    return EvalWindows(tokens, block_size, batch_size)
