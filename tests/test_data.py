"""Tests for gptcore.data: reading the corpus, the split, training batches and evaluation windows.

WHAT'S GOING ON HERE
  WHAT   1. read_corpus: the standard library by default; a folder read with a glob in sorted order;
            binary and non-UTF-8 files skipped and counted; every user error a one-line GptcoreError;
         2. split_tokens: nanoGPT's n = int(0.9 * len) split, and its argument checks;
         3. BatchSampler: every row is a real window of the stream with y = x shifted by one, start
            offsets reach both ends of their range, and a restored state draws the same batches;
         4. eval_windows: every target token scored exactly once, in batches of the asked size.
  HOW    Token streams are np.arange(n) where that helps: a token's value is then its position, so a
         window's first token says where it starts, and "is this a real slice" is an equality.
"""
import json
import os

import numpy as np
import pytest

from gptcore import data
from gptcore.data import BatchSampler, EvalWindows, eval_windows, read_corpus, split_tokens
from gptcore.errors import GptcoreError


# ---- 1. read_corpus ----------------------------------------------------------------------------------

def test_default_corpus_is_the_standard_library_source():
    text, report = read_corpus()
    assert report.files_read > 100
    assert report.characters == len(text) > 100_000
    assert "standard library" in report.source
    assert "def " in text and "import " in text
    assert "site-packages" not in " ".join(path for path, _ in report.skipped)
    assert "files" in str(report)


def write(path, content):
    """Create `path` (and its folders) holding `content`, str as UTF-8 or raw bytes; return path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, "utf-8")
    return path


def fifo(folder):
    os.mkfifo(folder / "fifo")              # exists, but reading it would block: not a file to read
    return folder / "fifo"


def test_folder_is_read_with_the_glob_at_every_depth_in_sorted_order(tmp_path):
    write(tmp_path / "c.txt", "C")
    write(tmp_path / "a" / "b.txt", "B")
    write(tmp_path / "a" / "z" / "deep.txt", "D")
    write(tmp_path / "skip.py", "not a txt")
    text, report = read_corpus(tmp_path, glob="*.txt")
    assert text == "B\nD\nC"                 # a/b.txt < a/z/deep.txt < c.txt
    assert (report.files_read, report.files_skipped, report.characters) == (3, 0, 5)
    assert read_corpus(tmp_path, glob="*.py")[0] == "not a txt"


def test_binary_and_non_utf8_files_in_a_folder_are_skipped_and_counted(tmp_path):
    write(tmp_path / "good.py", "x = 1\n")
    write(tmp_path / "binary.py", b"x = 1\x00\x01\x02")
    write(tmp_path / "latin1.py", "caf\xe9 = 1".encode("latin-1"))
    text, report = read_corpus(tmp_path)
    assert text == "x = 1\n"
    assert (report.files_read, report.files_skipped) == (1, 2)
    reasons = dict((os.path.basename(p), why) for p, why in report.skipped)
    assert "binary" in reasons["binary.py"] and "not UTF-8" in reasons["latin1.py"]
    assert "skipped 2" in str(report)


def test_windows_newlines_and_a_byte_order_mark_are_normalized_away(tmp_path):
    path = write(tmp_path / "win.txt", b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert read_corpus(path)[0] == "one\ntwo\nthree\n"


def test_empty_files_add_nothing_not_even_a_separator(tmp_path):
    write(tmp_path / "a.txt", "A")
    write(tmp_path / "b.txt", "")
    write(tmp_path / "c.txt", "C")
    text, report = read_corpus(tmp_path, glob="*.txt")
    assert text == "A\nC" and report.files_read == 3


def test_a_single_file_is_read_whole(tmp_path):
    path = write(tmp_path / "input.txt", "First Citizen:\nBefore we proceed")
    text, report = read_corpus(str(path))
    assert text == "First Citizen:\nBefore we proceed" and report.files_read == 1


def _unreadable(monkeypatch):
    """Make every open() in gptcore.data fail as a permission error would (we run as root here,
    where chmod 000 does not stop a read)."""
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(data, "open", refuse, raising=False)


@pytest.mark.parametrize("make, glob, expected", [
    (lambda p: p / "missing.txt", "*.py", "does not exist"),
    (lambda p: write(p / "only.txt", "x").parent, "*.py", "no files matching '\\*.py'"),
    (lambda p: write(p / "blob.bin", b"ab\x00cd"), "*.py", "is binary"),
    (lambda p: write(p / "latin.txt", b"caf\xe9"), "*.py", "is not UTF-8"),
    (lambda p: write(p / "empty.txt", ""), "*.py", "is empty"),
    (lambda p: write(write(p / "a.py", "").parent / "b.py", b"\x00").parent, "*.py", "the corpus is empty"),
    (lambda p: p, "sub/*.py", "must match file names"),
    (fifo, "*.py", "neither a regular file nor a folder"),
])
def test_unusable_corpus_paths_raise_one_line_errors(tmp_path, make, glob, expected):
    path = make(tmp_path)
    with pytest.raises(GptcoreError, match=expected) as err:
        read_corpus(path, glob=glob)
    assert "\n" not in str(err.value)


def test_an_unreadable_single_file_is_an_error_and_in_a_folder_a_skip(tmp_path, monkeypatch):
    path = write(tmp_path / "a.py", "x")
    _unreadable(monkeypatch)
    with pytest.raises(GptcoreError, match="cannot read corpus file .*Permission denied"):
        read_corpus(path)
    with pytest.raises(GptcoreError, match="the corpus is empty.*1 skipped"):
        read_corpus(tmp_path)


# ---- 2. split_tokens ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 9, 10, 11, 1000, 1003])
def test_split_keeps_nanogpts_first_ninety_percent_for_training(n):
    ids = np.arange(n)
    train, val = split_tokens(ids)
    assert len(train) == int(0.9 * n) and len(train) + len(val) == n
    assert np.array_equal(np.concatenate([train, val]), ids)


def test_split_with_other_fractions():
    ids = np.arange(100)
    assert [len(part) for part in split_tokens(ids, 0.0)] == [100, 0]
    assert [len(part) for part in split_tokens(ids, 0.25)] == [75, 25]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_split_refuses_a_fraction_outside_zero_to_one(bad):
    with pytest.raises(GptcoreError, match="val_fraction"):
        split_tokens(np.arange(10), bad)


# ---- 3. BatchSampler ---------------------------------------------------------------------------------

def test_sampler_rows_are_real_windows_with_targets_shifted_by_one():
    tokens = np.arange(500, dtype=np.int64) * 3 + 7        # distinct values: the first one locates a row
    sampler = BatchSampler(tokens, batch_size=6, block_size=10, seed=0)
    for _ in range(20):
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (6, 10) and x.dtype == y.dtype == np.int64
        assert np.array_equal(y[:, :-1], x[:, 1:])
        for row_x, row_y in zip(x, y):
            start = int(np.flatnonzero(tokens == row_x[0])[0])
            assert np.array_equal(row_x, tokens[start:start + 10])
            assert np.array_equal(row_y, tokens[start + 1:start + 11])


def test_sampler_offsets_reach_both_ends_of_their_range():
    tokens = np.arange(13)                                  # block 10: starts 0, 1, 2 only
    sampler = BatchSampler(tokens, batch_size=8, block_size=10, seed=1)
    starts = set()
    for _ in range(20):
        x, y = sampler.next_batch()
        starts.update(x[:, 0].tolist())
        assert y.max() <= 12
    assert starts == {0, 1, 2}
    one_window = BatchSampler(np.arange(11), batch_size=2, block_size=10, seed=0).next_batch()
    assert one_window[0][:, 0].tolist() == [0, 0]


def test_sampler_refuses_a_corpus_shorter_than_one_window():
    with pytest.raises(GptcoreError, match="corpus shorter than one window: 10 tokens, need block_size"):
        BatchSampler(np.arange(10), batch_size=2, block_size=10, seed=0)
    with pytest.raises(GptcoreError, match="batch_size"):
        BatchSampler(np.arange(100), batch_size=0, block_size=10, seed=0)


def test_restored_sampler_state_draws_the_same_next_batches():
    tokens = np.arange(1000)
    original = BatchSampler(tokens, batch_size=4, block_size=8, seed=123)
    for _ in range(3):
        original.next_batch()
    saved = json.loads(json.dumps(original.state()))        # through JSON, as a checkpoint stores it
    expected = [original.next_batch() for _ in range(5)]
    resumed = BatchSampler(tokens, batch_size=4, block_size=8, seed=999)
    resumed.set_state(saved)
    for want_x, want_y in expected:
        got_x, got_y = resumed.next_batch()
        assert np.array_equal(got_x, want_x) and np.array_equal(got_y, want_y)


def test_sampler_refuses_a_damaged_state():
    sampler = BatchSampler(np.arange(100), batch_size=2, block_size=4, seed=0)
    with pytest.raises(GptcoreError):
        sampler.set_state({"bit_generator": "MT19937", "state": {}})
    with pytest.raises(GptcoreError):
        sampler.set_state({"bit_generator": "PCG64", "state": "nonsense"})


# ---- 4. eval_windows ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n, T, batch_size", [(11, 10, 4), (21, 10, 4), (100, 7, 3), (64, 8, 100), (1000, 16, 5)])
def test_eval_windows_score_every_target_token_exactly_once(n, T, batch_size):
    tokens = np.arange(n)
    windows = eval_windows(tokens, T, batch_size=batch_size)
    n_windows = (n - 1) // T
    batches = list(windows)
    assert len(batches) == len(windows) == -(-n_windows // batch_size)
    targets = []
    for x, y in batches:
        assert 1 <= len(x) <= batch_size and x.shape == y.shape and x.shape[1] == T
        assert x.dtype == y.dtype == np.int64
        assert np.array_equal(y, x + 1)                    # targets are the inputs shifted by one
        assert np.array_equal(x[:, 0] % T, np.zeros(len(x)))   # windows start at multiples of T
        targets += y.ravel().tolist()
    assert sorted(targets) == list(range(1, n_windows * T + 1))   # each predicted token once
    assert len(set(targets)) == len(targets)


def test_eval_windows_docstring_example():
    (x, y), = EvalWindows(np.arange(8), block_size=3, batch_size=8)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5]] and y.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_eval_windows_refuses_data_shorter_than_one_window_when_called():
    with pytest.raises(GptcoreError, match="shorter than one window: 10 tokens"):
        eval_windows(np.arange(10), 10)                     # raises now, not at the first next()
