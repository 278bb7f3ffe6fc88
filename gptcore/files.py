"""gptcore.files: writing files so that a crash never leaves half of one, and appending JSON lines.

WHAT'S GOING ON HERE
====================

WHAT
  atomic_write(path, data)            replace a file's contents all at once, or not at all
  remove_leftover_temp_files(folder, names)
                                      delete the temporary files a killed atomic_write left behind
  append_json_line(path, record)      one JSON object per line (metrics.jsonl)

  Checkpoints (gptcore.checkpoint), tokenizer files (gptcore.tokenizer) and the training metrics
  (gptcore.train) are written through here. This module imports nothing from gptcore, so any module
  can use it without an import cycle.

HOW (a write that is killed halfway)
  Writing a file in place is not safe: a write killed halfway (Ctrl-C, out of memory, a full disk)
  leaves a truncated file under the real name, and the last good version is gone with it. So
  atomic_write writes a temporary file in the same folder (".<name>.<random>.tmp"), flushes and
  fsyncs it (the bytes are on disk), and only then os.replace's it onto its real name. A rename
  within one filesystem is atomic: a reader sees the old file or the new one, never a mixture. The
  rename is fsync'd into its folder too, so several files' renames reach the disk in the order we
  made them. A kill -9 between the write and the rename leaves the temporary file behind; its name
  can never be mistaken for the real file, and remove_leftover_temp_files deletes it.
"""
import contextlib
import json
import os
import uuid


def _temp_prefix(name):
    return f".{name}."


def _fsync_folder(folder):
    """Make a rename inside `folder` durable. Some systems cannot open a folder; there we do without."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, data: bytes):
    """Write `data` to `path` so that a crash at any moment leaves either the old file or the new one:
    write a temporary file in the same folder, fsync it, os.replace it onto `path`. On an exception
    (KeyboardInterrupt too) the temporary file is deleted and the old file is untouched."""
    folder, name = os.path.split(os.path.abspath(path))
    # A random name, not tempfile.mkstemp: mkstemp creates the file with mode 0600, and os.replace
    # would hand that on to the real file; a file created by open() gets the usual umask.
    tmp = os.path.join(folder, f"{_temp_prefix(name)}{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())        # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def remove_leftover_temp_files(folder, names):
    """Delete the ".<name>.<random>.tmp" files atomic_write leaves when killed, for each name in
    `names`; nothing else in `folder` is touched."""
    for entry in os.listdir(folder):
        if entry.endswith(".tmp") and any(entry.startswith(_temp_prefix(name)) for name in names):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, entry))


def append_json_line(path, record):
    """Append `record` (a JSON-serializable dict) to `path` as one line. Not atomic: a process killed
    while writing can leave the last line cut short (gptcore.train drops such a line on resume)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
