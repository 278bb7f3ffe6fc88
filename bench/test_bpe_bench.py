"""Byte-level BPE: gptcore's encoder and trainer side by side with tiktoken and Hugging Face `tokenizers`.

WHAT'S GOING ON HERE
  Three groups, each timed in one run (`flock /tmp/bench.lock python3 -m pytest bench/test_bpe_bench.py`):
    encode: GPT-2's tokenizer on the whole of tinyshakespeare.txt, one call each, one thread, cold
            cache (gptcore's chunk cache lives for one call): gptcore (the compiled scanner and
            merge loop), tiktoken's encode_ordinary, Hugging Face's Tokenizer.encode, and gptcore's
            pure-Python reference (encode_reference: `regex` then the Python merge loop) on the
            first tenth of the text. Work is tokens, so the summary compares time per token.
    train 4096: a 4,096-token vocabulary trained on tinyshakespeare.txt: gptcore's incremental trainer
            and Hugging Face's BpeTrainer with a byte-level pre-tokenizer (its threads: all cores).
    train 512 on 100k: the reference trainer (minbpe's algorithm: recount every pair after every
            merge) against the incremental one, on a text where the reference finishes.
  The conftest summary prints the other implementation's median time per unit over gptcore's (> 1:
  gptcore is faster). Needs ../shared/data/ and the oracles (pip install .[test]).
"""
import pathlib

import pytest

from conftest import record
from gptcore import bpe
from gptcore.tokenizer import BPETokenizer, load_tokenizer

SHARED = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if not (SHARED / "tinyshakespeare.txt").is_file():
    pytest.skip(f"{SHARED} (tinyshakespeare.txt, GPT-2's files) is missing", allow_module_level=True)
TEXT = (SHARED / "tinyshakespeare.txt").read_text("utf-8")
SMALL = TEXT[:100_000]


@pytest.fixture(scope="module")
def encoders():
    tiktoken = pytest.importorskip("tiktoken")
    tokenizers = pytest.importorskip("tokenizers")
    import tiktoken.load
    ranks = tiktoken.load.load_tiktoken_bpe(str(SHARED / "gpt2" / "gpt2.tiktoken"))
    tik = tiktoken.Encoding("gpt2", pat_str=bpe.GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={bpe.ENDOFTEXT: 50256})
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(SHARED / "gpt2" / "vocab.json"),
                                                              str(SHARED / "gpt2" / "merges.txt")))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ours = load_tokenizer("gpt2")
    ours.encode("warm up: build the class table once")
    tik.encode_ordinary("warm up")
    return {"gptcore": ours.encode, "tiktoken": tik.encode_ordinary, "hf": lambda text: hf.encode(text).ids,
            "reference": ours.encode_reference}


@pytest.mark.parametrize("implementation", ["gptcore", "tiktoken", "hf", "reference"])
def test_encode_gpt2_tinyshakespeare(benchmark, encoders, implementation):
    text = TEXT[:len(TEXT) // 10] if implementation == "reference" else TEXT
    encode = encoders[implementation]
    tokens = len(encode(text))
    record(benchmark, "bpe encode gpt2 tinyshakespeare", implementation, tokens, "token")
    benchmark.pedantic(encode, args=(text,), rounds=3 if implementation == "reference" else 9, iterations=1)


def hf_train(text, vocab_size):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([text], trainer)
    return hf


@pytest.mark.parametrize("implementation", ["gptcore", "hf"])
def test_train_4096_tinyshakespeare(benchmark, implementation):
    train = (lambda: BPETokenizer.train(TEXT, 4096)) if implementation == "gptcore" else \
        (lambda: hf_train(TEXT, 4096))
    record(benchmark, "bpe train 4096 tinyshakespeare", implementation, 1, "run")
    benchmark.pedantic(train, rounds=3, iterations=1)


@pytest.mark.parametrize("implementation", ["gptcore", "reference"])
def test_train_512_on_100k_characters(benchmark, implementation):
    train = (lambda: BPETokenizer.train(SMALL, 512)) if implementation == "gptcore" else \
        (lambda: bpe.train_reference(SMALL, 512))
    record(benchmark, "bpe train 512 on 100k characters", implementation, 1, "run")
    benchmark.pedantic(train, rounds=1 if implementation == "reference" else 3, iterations=1)
