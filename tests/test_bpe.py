"""Byte-level BPE (gptcore.bpe, gptcore._bpe): GPT-2's tokenizer exactly, and the trainer exactly.

WHAT'S GOING ON HERE
  WHAT   A chain of oracles, as for the kernels:
           1. GPT-2 encoding equals tiktoken's (built offline from ../shared/data/gpt2/gpt2.tiktoken) and
              Hugging Face `tokenizers`' (built from vocab.json + merges.txt) on every text in
              ../shared/data/, on Python source, and on hypothesis text (arbitrary unicode, whitespace
              runs, digits, contractions, emoji, combining marks); decode(encode(t)) == t;
           2. the compiled pre-split and merge loop equal the `regex` reference and the pure-Python
              merge, chunk for chunk and id for id;
           3. the trainers agree merge for merge: BPETokenizer.train (compiled, gptcore._bpe.train_merges),
              bpe.train_incremental (Python) and bpe.train_reference (minbpe's algorithm), with the
              tie rule and the overlap rule pinned by hand-worked examples;
           4. files: save -> Hugging Face (tokenizers, transformers) gives the same ids; every format
              loads to the same tokenizer; bad input raises one clear GptcoreError each.
  HOW    The oracles are test dependencies only (pip install .[test]); without them, or without
         ../shared/data, the tests that need them skip and say why. transformers runs with
         HF_HUB_OFFLINE=1: it must never try the network.
"""
import collections
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptcore import _bpe, bpe
from gptcore.errors import GptcoreError
from gptcore.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
GPT2_FILES = SHARED / "gpt2"
needs_shared = pytest.mark.skipif(not (GPT2_FILES / "gpt2.tiktoken").is_file(),
                                  reason=f"the test data folder {SHARED} (GPT-2's files, tinyshakespeare) is missing")


def shared_texts():
    """Every text file in ../shared/data/, as (name, text)."""
    if not SHARED.is_dir():
        return []
    return [(str(path.relative_to(SHARED)), path.read_text("utf-8")) for path in sorted(SHARED.rglob("*"))
            if path.is_file()]


def python_sources():
    files = sorted((ROOT / "gptcore").glob("*.py")) + sorted((ROOT / "gptcore").glob("*.pyx")) + \
        [pathlib.Path(json.__file__), pathlib.Path(pathlib.__file__)]
    return [(path.name, path.read_text("utf-8")) for path in files]


# awkward pieces the pattern treats specially, for hypothesis to combine
PIECES = [" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "\u00a0", "\u3000", "\u2028", "\x0b", "\x1c",
          "'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'d", "'", "''", "don't", "I'M", "we'LL",
          "0", "7", "123", "4567890", "٣", "Ⅷ", "½", "²", "😀", "👍🏽", "👨‍👩‍👧", "e\u0301", "\u0301", "\u0300a",
          "ü", "ß", "漢字", "Ωmega", "ǅ", "ʰ", "$", "...", "!?", "a", "Word", "x", "_", "-", "<|endoftext|>",
          "\ufeff", "\u200b", "\U0010ffff", "\x00"]
awkward_text = st.lists(st.sampled_from(PIECES) | st.text(max_size=3), max_size=30).map("".join)
any_text = st.text(max_size=60) | awkward_text


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    if not (GPT2_FILES / "gpt2.tiktoken").is_file():
        pytest.skip(f"{GPT2_FILES} is missing")
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken (a test dependency) is not installed")
    import tiktoken.load
    ranks = tiktoken.load.load_tiktoken_bpe(str(GPT2_FILES / "gpt2.tiktoken"))
    return tiktoken.Encoding("gpt2", pat_str=bpe.GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={bpe.ENDOFTEXT: 50256})


@pytest.fixture(scope="module")
def hf_gpt2():
    if not (GPT2_FILES / "vocab.json").is_file():
        pytest.skip(f"{GPT2_FILES} is missing")
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers (a test dependency) is not installed")
    model = tokenizers.models.BPE.from_file(str(GPT2_FILES / "vocab.json"), str(GPT2_FILES / "merges.txt"))
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    return hf


# ----------------------------------------------------------------------------------------------------
# 1. GPT-2, exactly
# ----------------------------------------------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("name, text", shared_texts() + python_sources(), ids=lambda x: x if len(x) < 40 else "")
def test_gpt2_encoding_equals_tiktoken_and_hugging_face(gpt2, tiktoken_gpt2, hf_gpt2, name, text):
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert ids == hf_gpt2.encode(text).ids
    assert gpt2.decode(ids) == text


@needs_shared
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_gpt2_encoding_equals_tiktoken_and_hugging_face_on_any_text(gpt2, tiktoken_gpt2, hf_gpt2, text):
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert ids == hf_gpt2.encode(text).ids
    assert ids == gpt2.encode_reference(text)
    assert gpt2.decode(ids) == text
    with_special = gpt2.encode(text, allowed_special="all")
    assert with_special == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(with_special) == text


def test_endoftext_is_one_token_only_when_allowed(gpt2):
    text = "a<|endoftext|>b"
    assert gpt2.encode(text, allowed_special="all") == gpt2.encode("a") + [50256] + gpt2.encode("b")
    assert gpt2.encode(text, allowed_special={bpe.ENDOFTEXT}) == gpt2.encode(text, allowed_special="all")
    ordinary = gpt2.encode(text)
    assert 50256 not in ordinary and gpt2.decode(ordinary) == text
    assert gpt2.decode([50256]) == bpe.ENDOFTEXT
    with pytest.raises(GptcoreError, match="'<|pad|>' is not a special token"):
        gpt2.encode(text, allowed_special={"<|pad|>"})
    with pytest.raises(TypeError, match='"all" or a set'):
        gpt2.encode(text, allowed_special="al")


@needs_shared
def test_allowed_special_matches_tiktoken(gpt2, tiktoken_gpt2):
    text = "<|endoftext|>Hello<|endoftext|><|endoftext|> world<|endoftext"
    assert gpt2.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")


@needs_shared
def test_decode_of_a_cut_character_replaces_its_bytes_as_tiktoken_does(gpt2, tiktoken_gpt2):
    ids = gpt2.encode("a😀é漢")
    assert len(ids) > 4                       # the emoji and the kanji are several byte tokens each
    for end in range(len(ids) + 1):
        assert gpt2.decode(ids[:end]) == tiktoken_gpt2.decode(ids[:end])
    assert "\ufffd" in gpt2.decode(ids[:2])
    assert b"".join(gpt2.token_bytes(i) for i in ids).decode("utf-8") == "a😀é漢"


@needs_shared
def test_lone_surrogate_is_encoded_as_the_replacement_character_as_tiktoken_does(gpt2, tiktoken_gpt2):
    assert gpt2.encode("a\ud800b") == tiktoken_gpt2.encode_ordinary("a\ud800b") == gpt2.encode("a\ufffdb")


# ----------------------------------------------------------------------------------------------------
# 2. the compiled pre-split and merge loop against the reference
# ----------------------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(text=any_text)
def test_compiled_gpt2_split_equals_the_regex_split(text):
    assert _bpe.split_gpt2(text, bpe._class_table()) == bpe.split_text(text, "gpt2")


@pytest.mark.parametrize("text, chunks", [
    ("Hello world's 42!!", ["Hello", " world", "'s", " 42", "!!"]),
    ("a   b", ["a", "  ", " b"]),                  # the last space of a run joins the word after it
    ("a \n b", ["a", " \n", " b"]),
    ("x\t\ty", ["x", "\t", "\t", "y"]),
    ("end  ", ["end", "  "]),
    ("it'S they're '' 'x", ["it", "'", "S", " they", "'re", " ''", " '", "x"]),
])
def test_gpt2_split_cuts_where_the_pattern_says(text, chunks):
    assert bpe.split_text(text) == chunks
    assert _bpe.split_gpt2(text, bpe._class_table()) == chunks


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_compiled_merge_loop_equals_the_reference_on_python_source(gpt2, pattern):
    tok = BPETokenizer(gpt2.byte_ids, gpt2.merges, gpt2.merged_ids, gpt2.special_tokens, pattern)
    text = python_sources()[0][1]
    assert tok.encode(text) == tok.encode_reference(text)


def test_merge_worked_example():
    assert bpe.merge([1, 2, 3, 1, 2], (1, 2), 256) == [256, 3, 256]
    assert bpe.merge([5, 5, 5], (5, 5), 256) == [256, 5]
    assert bpe.pair_counts([5, 5, 5]) == {(5, 5): 2}


# ----------------------------------------------------------------------------------------------------
# 3. training
# ----------------------------------------------------------------------------------------------------

def test_ties_go_to_the_smallest_pair_and_pairs_overlap():
    # "aaa" holds (a, a) twice and wins; then every pair has count 1: the smallest, (' ', 'b'), goes first
    assert bpe.train_reference("aaa bb", 258) == [(97, 97), (32, 98)]
    assert BPETokenizer.train("aaa bb", 258).merges == [(97, 97), (32, 98)]
    # "ab cd": three pairs of count 1; (32, 99) < (97, 98) < (99, 100)
    assert BPETokenizer.train("ab cd", 259).merges == [(32, 99), (97, 98), (256, 100)]


def test_training_stops_when_no_pair_is_left():
    assert BPETokenizer.train("ab", 1000).merges == [(97, 98)]
    assert BPETokenizer.train("", 300).vocab_size == 256


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_incremental_trainer_makes_the_reference_merges_on_shakespeare(pattern):
    path = SHARED / "tinyshakespeare.txt"
    text = path.read_text("utf-8")[:20000] if path.is_file() else python_sources()[0][1][:20000]
    text += " naïve café 😀😀 1234567 don't I'LL\n\n\n  "
    assert BPETokenizer.train(text, 256 + 120, pattern).merges == bpe.train_reference(text, 256 + 120, pattern)


def chunk_counts(text, pattern):
    return {chunk.encode("utf-8"): n for chunk, n in collections.Counter(bpe.split_text(text, pattern)).items()}


def test_compiled_trainer_makes_the_python_incremental_trainers_merges_on_a_large_vocabulary():
    path = SHARED / "tinyshakespeare.txt"
    text = path.read_text("utf-8")[:300000] if path.is_file() else "".join(t for _, t in python_sources())
    merges = BPETokenizer.train(text, 3000).merges
    assert len(merges) == 3000 - 256
    assert merges == bpe.train_incremental(chunk_counts(text, "gpt2"), 3000)


@settings(max_examples=60, deadline=None)
@given(text=any_text, extra=st.integers(0, 40), pattern=st.sampled_from(["gpt2", "gpt4"]))
def test_incremental_trainer_makes_the_reference_merges_on_any_text(text, extra, pattern):
    tok = BPETokenizer.train(text, 256 + extra, pattern)
    assert tok.merges == bpe.train_reference(text, 256 + extra, pattern) == \
        bpe.train_incremental(chunk_counts(text, pattern), 256 + extra)
    assert tok.merged_ids == list(range(256, 256 + len(tok.merges)))
    ids = tok.encode(text)
    assert ids == tok.encode_reference(text) and tok.decode(ids) == text


def test_special_tokens_are_added_after_training():
    tok = BPETokenizer.train("hello hello world", 260).with_special_tokens([bpe.ENDOFTEXT])
    assert tok.special_tokens == {bpe.ENDOFTEXT: 260} and tok.vocab_size == 261
    assert tok.encode("hi<|endoftext|>", allowed_special="all")[-1] == 260


def test_vocab_size_below_256_is_refused():
    with pytest.raises(GptcoreError, match="at least 256"):
        BPETokenizer.train("hello", 255)


# ----------------------------------------------------------------------------------------------------
# 4. files
# ----------------------------------------------------------------------------------------------------

SAMPLE = "Hello world! It's 2024, naïve café 😀 —\n\n    def f(x):\n\treturn x ** 2  \n"


@pytest.fixture(scope="module")
def trained():
    text = (SHARED / "tinyshakespeare.txt").read_text("utf-8")[:50000] if SHARED.is_dir() else SAMPLE * 50
    return {pattern: BPETokenizer.train(text, 400, pattern).with_special_tokens([bpe.ENDOFTEXT])
            for pattern in ("gpt2", "gpt4")}


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_saved_tokenizer_gives_the_same_ids_in_hugging_face(trained, tmp_path, pattern):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = trained[pattern]
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path) == tok
    texts = [SAMPLE, "O Romeo, Romeo! wherefore art thou Romeo?", python_sources()[0][1][:3000]]
    from_file = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in texts:
        assert from_file.encode(text).ids == tok.encode(text)
        assert auto.encode(text) == tok.encode(text)
        assert auto.decode(tok.encode(text)) == text
    assert from_file.encode("a<|endoftext|>b").ids == tok.encode("a<|endoftext|>b", allowed_special="all")


def test_gpt2_saved_and_loaded_by_hugging_face_gives_the_same_ids(gpt2, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    gpt2.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(SAMPLE).ids == gpt2.encode(SAMPLE)
    assert load_tokenizer(tmp_path) == gpt2
    (tmp_path / "tokenizer.json").unlink()             # the older layout: vocab.json + merges.txt
    assert load_tokenizer(tmp_path) == gpt2


@needs_shared
def test_every_format_of_gpt2_loads_to_the_same_tokenizer(gpt2):
    assert load_tokenizer(GPT2_FILES) == gpt2
    assert load_tokenizer(GPT2_FILES / "gpt2.tiktoken", special_tokens={bpe.ENDOFTEXT: 50256}) == gpt2


def test_char_tokenizer_loads_through_load_tokenizer(tmp_path):
    tok = CharTokenizer.from_text("hello")
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path) == tok
    assert load_tokenizer(tmp_path / "tokenizer.json") == tok


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("files, message", [
    ({"tokenizer.json": '{"model": {"type": "BPE", '}, "not valid JSON"),
    ({"tokenizer.json": '{"model": {"type": "WordPiece", "vocab": {}}}'}, 'of type "BPE"'),
    ({"tokenizer.json": json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": [], "ignore_merges": True}})},
     '"ignore_merges": True, which gptcore does not implement'),
    ({"vocab.json": json.dumps({"a": 0}), "merges.txt": "a b\n"}, "no token for the byte 0x00"),
    ({"vocab.json": json.dumps({**{bpe.BYTE_TO_UNICODE[b]: b for b in range(256)}, "ab": 256}),
      "merges.txt": "#version: 0.2\na Q\nzz\n"}, "line 3: expected two tokens"),
    ({"vocab.json": json.dumps({**{bpe.BYTE_TO_UNICODE[b]: b for b in range(256)}, "ab": 256}),
      "merges.txt": "a ☃\n"}, "names the token '☃', which the vocabulary does not have"),
    ({"vocab.json": json.dumps({**{bpe.BYTE_TO_UNICODE[b]: b for b in range(256)}, "ab": 300}),
      "merges.txt": "a b\n"}, "out of range"),
    ({"x.tiktoken": "YQ== 0\nnot-base64!! 1\n"}, "line 2: expected `base64 rank`"),
])
def test_malformed_tokenizer_files_raise_one_clear_error(tmp_path, files, message):
    for name, text in files.items():
        _write(tmp_path / name, text)
    target = tmp_path / "x.tiktoken" if "x.tiktoken" in files else tmp_path
    with pytest.raises(GptcoreError, match=message):
        load_tokenizer(target)


def test_ids_out_of_range_raise(gpt2):
    with pytest.raises(GptcoreError, match="token id 50257 is outside"):
        gpt2.decode([1, 50257])
    with pytest.raises(GptcoreError, match="token id -1 is outside"):
        gpt2.decode([-1])
    with pytest.raises(TypeError, match="integers"):
        gpt2.decode([1.5])


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(GptcoreError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing")
    with pytest.raises(GptcoreError, match="no tokenizer.json, nor vocab.json"):
        load_tokenizer(tmp_path)
