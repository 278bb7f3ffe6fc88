"""Tests for gptcore.tokenizer.CharTokenizer: text <-> ids, and the tokenizer.json file.

WHAT'S GOING ON HERE
  WHAT   1. round trips: decode(encode(text)) == text for any text the vocabulary covers (hypothesis
            draws the text), also across encode's chunk boundaries; the module docstring's example;
         2. the contract: unknown characters, out-of-range ids, empty text raise GptcoreError whose
            message names the offenders;
         3. the file: save/load round trips, and every kind of damaged tokenizer.json is refused with
            a message naming what is wrong.
  WHERE  gptcore.checkpoint writes and reads tokenizer.json through these functions; its own tests
         check the file's place in a checkpoint.
"""
import doctest
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gptcore.tokenizer
from gptcore.errors import GptcoreError
from gptcore.tokenizer import CharTokenizer


# ---- 1. round trips ----------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(text=st.text(), extra=st.text(min_size=1))
def test_decode_of_encode_gives_back_any_text_the_vocabulary_covers(text, extra):
    tok = CharTokenizer.from_text(text + extra)           # a superset of text's characters
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text               # a plain list of ints works too


def test_vocabulary_is_the_sorted_set_of_characters_and_ids_are_positions():
    tok = CharTokenizer.from_text("hello, World!\n")
    assert tok.chars == tuple(sorted(set("hello, World!\n")))
    assert tok.vocab_size == 11
    assert [tok.encode(c)[0] for c in tok.chars] == list(range(tok.vocab_size))


def test_encode_gives_the_same_ids_across_chunk_boundaries(monkeypatch):
    text = "the quick brown fox é日本語 jumps\n" * 50
    tok = CharTokenizer.from_text(text)
    whole = tok.encode(text)
    monkeypatch.setattr(gptcore.tokenizer, "_CHUNK", 7)     # many chunks, boundaries everywhere
    assert np.array_equal(tok.encode(text), whole)
    assert tok.decode(whole) == text


def test_module_docstring_example_is_true():
    result = doctest.testmod(gptcore.tokenizer)
    assert result.attempted >= 3 and result.failed == 0


# ---- 2. the contract ---------------------------------------------------------------------------------

def test_encode_names_the_characters_missing_from_the_vocabulary_and_counts_them():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(GptcoreError) as err:
        tok.encode("abxzyxc\n")
    message = str(err.value)
    assert "'x'" in message and "'y'" in message and "'z'" in message and "'\\n'" in message
    assert "4 distinct" in message and "5 occurrence" in message
    assert "vocabulary of 3" in message


def test_encode_lists_at_most_ten_unknown_characters_and_says_how_many_more():
    tok = CharTokenizer.from_text("a")
    with pytest.raises(GptcoreError, match=r"15 distinct .* and 5 more"):
        tok.encode("bcdefghijklmnop")


def test_encode_reports_a_lone_surrogate_as_an_unknown_character():
    tok = CharTokenizer.from_text("ab")
    with pytest.raises(GptcoreError, match="ud800"):
        tok.encode("a\ud800b")


def test_decode_refuses_ids_outside_the_vocabulary():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(GptcoreError, match=r"token id 3 is outside .*\[0, 3\)"):
        tok.decode([0, 1, 3])
    with pytest.raises(GptcoreError, match="token id -1"):
        tok.decode(np.array([-1, 0]))
    with pytest.raises(TypeError):
        tok.decode([0.0, 1.0])
    assert tok.decode([]) == ""


def test_empty_text_cannot_build_a_tokenizer():
    with pytest.raises(GptcoreError, match="empty"):
        CharTokenizer.from_text("")


# ---- 3. the tokenizer.json file ----------------------------------------------------------------------

def test_save_then_load_gives_the_same_tokenizer(tmp_path):
    tok = CharTokenizer.from_text('say "hi"\\\n\tnaïve 日本 \x00\x7f')
    path = tmp_path / "tokenizer.json"
    tok.save(tmp_path)
    loaded = CharTokenizer.load(path)
    assert loaded == tok and loaded.chars == tok.chars
    assert json.loads(path.read_text("utf-8"))["model"]["vocab"] == {c: i for i, c in enumerate(tok.chars)}
    # no temporary file left behind
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]


def test_from_json_keeps_the_order_of_the_file_even_if_unsorted():
    tok = CharTokenizer.from_json('{"type": "char", "vocab": ["z", "a", "m"]}')
    assert tok.encode("zam").tolist() == [0, 1, 2] and tok.decode([2, 1, 0]) == "maz"


@pytest.mark.parametrize("content, expected", [
    ('{"type": "char", "vocab": ["a", "b"', "not valid JSON"),
    ('["a", "b"]', "must hold a JSON object"),
    ('{"vocab": ["a"]}', 'no "type" field'),
    ('{"type": "bpe", "vocab": ["a"]}', "'bpe'"),
    ('{"type": "char"}', 'no "vocab" field'),
    ('{"type": "char", "vocab": "abc"}', "must be a list"),
    ('{"type": "char", "vocab": []}', "vocabulary is empty"),
    ('{"type": "char", "vocab": ["a", "bc"]}', r"vocab\[1\] is 'bc', not a single character"),
    ('{"type": "char", "vocab": ["a", 7]}', r"vocab\[1\] is 7"),
    ('{"type": "char", "vocab": ["a", "b", "a"]}', r"'a' appears twice .*ids 0 and 2"),
    ('{"type": "char", "vocab": ["a", "\\ud800"]}', "lone surrogate U\\+D800"),
])
def test_loading_a_damaged_tokenizer_json_names_the_problem(tmp_path, content, expected):
    path = tmp_path / "tokenizer.json"
    path.write_text(content, "utf-8")
    with pytest.raises(GptcoreError, match=expected) as err:
        CharTokenizer.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_loading_a_missing_or_non_utf8_tokenizer_file_raises(tmp_path):
    with pytest.raises(GptcoreError, match="does not exist"):
        CharTokenizer.load(tmp_path / "nothing.json")
    path = tmp_path / "tokenizer.json"
    path.write_bytes(b'{"type": "char", "vocab": ["\xff"]}')
    with pytest.raises(GptcoreError, match="not UTF-8"):
        CharTokenizer.load(path)
