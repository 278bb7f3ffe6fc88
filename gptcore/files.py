"""gptcore.files: writing files so that a crash never leaves half of one, and appending JSON lines.

WHAT'S GOING ON HERE
====================

WHAT
  atomic_write(path, data)            replace a file's contents all at once, or not at all
  remove_leftover_temp_files(folder, names)
                                      delete the temporary files a killed atomic_write left behind
  write_new_file(path, data)          create a file that did not exist and fsync it (the files of a
                                      checkpoint folder that nobody can see yet)
  fsync_folder(folder)                make the renames and creations inside a folder durable
  remove_tree(path)                   delete a folder and everything in it, ignoring what is gone
  append_json_line(path, record)      one JSON object per line (metrics.jsonl), in one write
  read_json_lines(path)               the records of such a file, skipping lines a crash cut short

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

HOW (metrics.jsonl)
  append_json_line writes each line with a single write() on a file opened O_APPEND, so a kill -9
  cannot interleave or half-write a line in practice; a power cut still can, and a file edited by
  hand can hold anything. read_json_lines therefore reads bytes, not text, and skips (and counts) a
  line that is not UTF-8, not JSON, or not an object with an integer "step".
"""
import contextlib
import errno
import json
import os
import shutil
import uuid


def _temp_prefix(name):
    return f".{name}."


def fsync_folder(folder):
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
    fsync_folder(folder)


def remove_leftover_temp_files(folder, names):
    """Delete the ".<name>.<random>.tmp" files atomic_write leaves when killed, for each name in
    `names`; nothing else in `folder` is touched."""
    for entry in os.listdir(folder):
        if entry.endswith(".tmp") and any(entry.startswith(_temp_prefix(name)) for name in names):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, entry))


def write_new_file(path, data: bytes):
    """Create `path` (which must not exist) holding `data`, flushed and fsync'd. For files inside a
    folder nobody reads yet (a checkpoint being written): the folder's rename is the atomic step, so
    the file itself needs no temporary name. On an exception the half-written file is deleted."""
    try:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def remove_tree(path):
    """Delete `path` and everything under it; what is already gone (or cannot go) is left alone."""
    shutil.rmtree(path, ignore_errors=True)


def append_json_line(path, record):
    """Append `record` (a JSON-serializable dict) to `path` as one line, in a single write() on a
    file opened O_APPEND: no other writer's line can land in the middle of it, and a kill -9 cannot
    stop the write halfway (a power cut can; read_json_lines skips such a line)."""
    line = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(fd, line)
        if written != len(line):            # a full disk can accept part of it
            raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written", path)
    finally:
        os.close(fd)


def read_json_lines(path):
    """-> (records, skipped): the JSON objects with an integer "step", one per line of `path`, and
    how many other non-empty lines (cut short, not UTF-8, not JSON, no step) were skipped."""
    with open(path, "rb") as f:
        raw = f.read()
    records, skipped = [], 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            skipped += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            skipped += 1
            continue
        records.append(record)
    return records, skipped
