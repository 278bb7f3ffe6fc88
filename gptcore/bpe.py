"""gptcore.bpe: byte-level byte-pair encoding, GPT-2's tokenizer exactly, and training your own.

WHAT'S GOING ON HERE
====================

WHAT
  A character tokenizer (gptcore.tokenizer.CharTokenizer) makes one token per character: long
  sequences, and a vocabulary that cannot grow. Byte-pair encoding (BPE) starts from the 256 byte
  values, so *any* text can be encoded (UTF-8 turns every character into 1-4 bytes; nothing is ever
  "unknown"), and then glues frequent neighbours into new tokens, one merge at a time:

      ids=[1, 2, 3, 1, 2], pair=(1, 2), idx=256 -> [256, 3, 256]          (merge, below)

  A tokenizer is that list of merges, in order. Encoding a word replays the merges the word allows,
  lowest rank (earliest merge) first; decoding concatenates each id's bytes. GPT-2's tokenizer is
  50,000 merges on top of the 256 bytes, plus one special token, <|endoftext|> = 50256.

  The four pieces, each a short function below (the readable reference, minbpe-sized):
    1. the pre-split (split_text): the text is first cut into chunks with a regex (GPT2_PATTERN:
       contractions, runs of letters, runs of digits, runs of other symbols, each with at most one
       leading space, and whitespace), and merges never cross a chunk boundary. Without it, BPE
       happily learns "dog." and "dog!" and "dog?" as three tokens; with it, words stay words.
       \\p{L} and \\p{N} (Unicode letters and numbers) need the `regex` package, not `re`.
    2. pair_counts and merge: count adjacent pairs (with overlaps: "aaa" holds (a, a) twice), and
       replace the non-overlapping occurrences of one pair, left to right.
    3. train_reference: start from the bytes, repeatedly merge the most frequent pair within chunks
       into a new id (256, 257, ...). Ties go to the smallest pair (left id, then right id): any two
       implementations that follow this rule make the same merges, so one can check the other.
    4. encode_chunk_reference: a chunk's bytes -> ids, applying the lowest-ranked pair present until
       no pair present has a merge.

  GPT-2's files spell each token's bytes as printable characters (bytes_to_unicode: the byte 0x20,
  a space, is written "Ġ"), because their vocab.json is JSON text and merges.txt splits on spaces.
  We read and write that spelling, and hold plain bytes inside.

WHERE
  BPETokenizer is the tokenizer a model uses: encode(text, allowed_special=()), decode(ids),
  vocab_size, save(folder), train(text, vocab_size, pattern). gptcore.tokenizer.load_tokenizer is the
  one way to load any tokenizer (gptcore's own, GPT-2's shipped files, Hugging Face folders,
  tiktoken files); it calls the readers here.

HOW (the fast path and its twin)
  The functions above are the reference. BPETokenizer.encode runs the same algorithm compiled
  (gptcore._bpe): a hand-written scanner for GPT2_PATTERN over code points, then the merge loop over a
  hash table of pair ranks, with a cache of chunk -> ids for the call (a text repeats its words).
  Other patterns (GPT4_PATTERN) are split with `regex` and merged by the compiled loop. The training
  reference recounts every pair of the text after every merge; train_incremental counts each
  distinct chunk once with its frequency and, after a merge, updates only the chunks that held the
  merged pair; BPETokenizer.train runs that algorithm compiled (gptcore._bpe.train_merges).
  tests/test_bpe.py checks each fast path against its reference, id for id and merge for merge.

  Special tokens: plain encode(text) treats every character as text (as tiktoken's encode_ordinary
  does), so "<|endoftext|>" typed into a prompt is 7 ordinary tokens. Only allowed_special="all" or a
  set of names makes them one id each. decode of ids that end inside a UTF-8 character replaces the
  incomplete bytes with U+FFFD (errors="replace"), as GPT-2 does; token_bytes(id) gives the raw
  bytes, for a streaming decoder that waits for whole characters.

FILES
  save(folder) writes Hugging Face's layout: tokenizer.json (the whole pipeline: a ByteLevel
  pre-tokenizer, or a Split with our regex then ByteLevel, a BPE model with vocab and merges, the
  special tokens), vocab.json and merges.txt (GPT-2's original pair), and tokenizer_config.json, so
  transformers.AutoTokenizer.from_pretrained(folder) and tokenizers.Tokenizer.from_file give the same
  ids. A damaged file raises GptcoreError naming the file and what is wrong.
"""
import base64
import collections
import heapq
import json
import os
import re

import numpy as np
import regex

from gptcore import _bpe
from gptcore.errors import GptcoreError
from gptcore.files import atomic_write

# GPT-2's pre-split, as OpenAI's encoder.py, tiktoken's gpt2 encoding and Hugging Face's ByteLevel use it
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (tiktoken's cl100k_base): contractions in any case, numbers of at most 3 digits, newlines kept
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                r"""\s*[\r\n]|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
ENDOFTEXT = "<|endoftext|>"
N_BYTES = 256


def pattern_of(pattern):
    """"gpt2", "gpt4" or a regex string -> the regex string."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be 'gpt2', 'gpt4' or a regex string, got {type(pattern).__name__}")
    return PATTERNS.get(pattern, pattern)


# ----------------------------------------------------------------------------------------------------
# GPT-2's byte <-> unicode spelling (for reading and writing vocab.json, merges.txt, tokenizer.json)
# ----------------------------------------------------------------------------------------------------

def bytes_to_unicode():
    """{byte: a printable character}. The 188 bytes that are printable Latin-1 characters ('!'..'~',
    '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 (control characters, space, ...) are
    given the code points 256, 257, ... in byte order. So byte 0x20 (space) is 'Ġ' (U+0120) and 0x0A
    (newline) is 'Ċ' (U+010A): every token is a visible string without spaces."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(N_BYTES):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(N_BYTES + extra)
            extra += 1
    return mapping


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {char: byte for byte, char in BYTE_TO_UNICODE.items()}


def spell(token):
    """bytes -> GPT-2's spelling: b' the' -> 'Ġthe'."""
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def unspell(text):
    """GPT-2's spelling -> bytes, or None if a character is not one of the 256 byte characters."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in text)
    except KeyError:
        return None


# ----------------------------------------------------------------------------------------------------
# The reference: the algorithm in plain Python
# ----------------------------------------------------------------------------------------------------

def split_text(text, pattern="gpt2"):
    """The pre-split: text -> its chunks, in order, joined back they are the text.
    split_text("Hello world's 42!!") -> ['Hello', ' world', "'s", ' 42', '!!']"""
    return regex.findall(pattern_of(pattern), text)


def pair_counts(ids, counts=None):
    """Count adjacent pairs, with overlaps, adding into `counts` if given.
    pair_counts([1, 2, 3, 1, 2]) -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}; [5, 5, 5] holds (5, 5) twice."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids, pair, idx):
    """Replace each occurrence of `pair` in `ids` by `idx`, left to right, never overlapping.
    ids=[1, 2, 3, 1, 2], pair=(1, 2), idx=256 -> [256, 3, 256];  [5, 5, 5], (5, 5), 256 -> [256, 5]"""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def most_frequent_pair(counts):
    """The pair with the largest count; among equal counts the smallest pair (left id, then right)."""
    return min(counts, key=lambda pair: (-counts[pair], pair))


def check_vocab_size(vocab_size):
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise TypeError(f"vocab_size must be an integer, got {type(vocab_size).__name__}")
    if vocab_size < N_BYTES:
        raise GptcoreError(f"vocab_size must be at least {N_BYTES} (the byte tokens), got {vocab_size}")
    return int(vocab_size)


def train_reference(text, vocab_size, pattern="gpt2"):
    """minbpe's RegexTokenizer.train: -> merges, a list of (left_id, right_id), the i-th making id 256 + i.
    Every round recounts every pair of the whole text: simple, and slow (train_incremental is fast)."""
    vocab_size = check_vocab_size(vocab_size)
    chunks = [list(chunk.encode("utf-8")) for chunk in split_text(text, pattern)]
    merges = []
    for idx in range(N_BYTES, vocab_size):
        counts = {}
        for ids in chunks:
            pair_counts(ids, counts)
        if not counts:                  # every chunk is one token: nothing left to merge
            break
        pair = most_frequent_pair(counts)
        chunks = [merge(ids, pair, idx) for ids in chunks]
        merges.append(pair)
    return merges


def encode_chunk_reference(chunk, byte_ids, ranks):
    """One chunk's bytes -> ids. ranks: {(left, right): (rank, merged id)}. Start from the bytes' ids;
    while some adjacent pair has a merge, apply the one with the lowest rank (the earliest merge)."""
    ids = [byte_ids[b] for b in chunk]
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, (float("inf"),))[0])
        if pair not in ranks:
            break
        ids = merge(ids, pair, ranks[pair][1])
    return ids


# ----------------------------------------------------------------------------------------------------
# The fast trainer: each distinct chunk counted once, pair counts updated incrementally
# ----------------------------------------------------------------------------------------------------

def train_incremental(chunk_counts, vocab_size):
    """The same merges as train_reference, from {chunk bytes: how often the chunk occurs}.

    We keep, for every pair, its count (summed over distinct chunks, times each chunk's frequency)
    and the set of chunks it occurs in. A merge of (a, b) changes only the chunks holding (a, b): for
    each, we take its pairs' counts away, merge, and add the new chunk's pairs back. The most frequent
    pair comes from a heap of (-count, left, right), so among equal counts the smallest pair pops
    first (the tie rule); an entry whose count is no longer the pair's count is stale and skipped
    (every change pushes a fresh entry)."""
    vocab_size = check_vocab_size(vocab_size)
    words = [list(chunk) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    counts = collections.defaultdict(int)
    where = collections.defaultdict(set)             # pair -> indices of the words that may hold it
    for w, (ids, freq) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            counts[pair] += freq
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < vocab_size - N_BYTES and heap:
        negative, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -negative or negative == 0:
            continue                                  # stale: the count changed after this push
        idx = N_BYTES + len(merges)
        merges.append(pair)
        changed = set()
        for w in where.pop(pair):
            ids, freq = words[w], freqs[w]
            if len(ids) < 2:
                continue
            merged = merge(ids, pair, idx)
            if len(merged) == len(ids):
                continue                              # the pair left this word in an earlier merge
            for old in zip(ids, ids[1:]):
                counts[old] -= freq
                changed.add(old)
            for new in zip(merged, merged[1:]):
                counts[new] += freq
                where[new].add(w)
                changed.add(new)
            words[w] = merged
        counts.pop(pair, None)
        changed.discard(pair)
        for p in changed:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                del counts[p]
    return merges


# ----------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------

class BPETokenizer:
    """Byte-level BPE. byte_ids[b] is the id of the single byte b; merges[i] = (left_id, right_id) is
    the merge of rank i, making merged_ids[i]; special_tokens maps names such as "<|endoftext|>" to
    their ids. The ids must be exactly 0 .. vocab_size - 1. Build with train(), or load with
    gptcore.tokenizer.load_tokenizer."""

    def __init__(self, byte_ids, merges, merged_ids=None, special_tokens=None, pattern="gpt2",
                 source="the tokenizer"):
        byte_ids = [int(i) for i in byte_ids]
        merges = [(int(a), int(b)) for a, b in merges]
        merged_ids = list(range(N_BYTES, N_BYTES + len(merges))) if merged_ids is None else \
            [int(i) for i in merged_ids]
        special_tokens = dict(special_tokens or {})
        if len(byte_ids) != N_BYTES:
            raise GptcoreError(f"{source}: a byte-level tokenizer needs one token per byte value (256), "
                               f"got {len(byte_ids)}")
        if len(merged_ids) != len(merges):
            raise ValueError("merges and merged_ids must have the same length")
        all_ids = byte_ids + merged_ids + list(special_tokens.values())
        vocab_size = len(all_ids)
        if sorted(all_ids) != list(range(vocab_size)):
            seen = collections.Counter(all_ids)
            twice = [i for i, n in seen.items() if n > 1]
            outside = [i for i in all_ids if not 0 <= i < vocab_size]
            raise GptcoreError(f"{source}: the token ids must be 0 .. {vocab_size - 1}, each once; "
                               + (f"id {twice[0]} is used twice" if twice else f"id {outside[0]} is out of range"))
        token_bytes = [b""] * vocab_size
        for byte, i in enumerate(byte_ids):
            token_bytes[i] = bytes([byte])
        known = set(byte_ids)
        for rank, ((left, right), new) in enumerate(zip(merges, merged_ids)):
            if left not in known or right not in known:
                raise GptcoreError(f"{source}: merge {rank} ({left}, {right}) names token "
                                   f"{left if left not in known else right}, which no earlier merge makes")
            token_bytes[new] = token_bytes[left] + token_bytes[right]
            known.add(new)
        for name, i in special_tokens.items():
            if not isinstance(name, str) or not name:
                raise GptcoreError(f"{source}: special token {name!r} must be a non-empty string")
            token_bytes[i] = name.encode("utf-8")
        self.byte_ids, self.merges, self.merged_ids = byte_ids, merges, merged_ids
        self.special_tokens = special_tokens
        self.pattern = pattern_of(pattern)
        self._token_bytes = token_bytes
        # {(left, right): (rank, merged id)}: what encode looks up, in the reference and compiled
        self.ranks = {pair: (rank, new) for rank, (pair, new) in enumerate(zip(merges, merged_ids))}
        self._special_regex = None
        self._json = None
        if special_tokens:
            longest_first = sorted(special_tokens, key=len, reverse=True)
            self._special_regex = re.compile("|".join(re.escape(name) for name in longest_first))
        self._compiled = _bpe.MergeTable(self.byte_ids, [a for a, _ in merges], [b for _, b in merges],
                                         merged_ids)

    # ---- building -----------------------------------------------------------------------------------

    @classmethod
    def train(cls, text, vocab_size, pattern="gpt2"):
        """Learn vocab_size - 256 merges from `text` (fewer if the text runs out of pairs), with ids
        0-255 the byte values and the i-th merge making id 256 + i."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        vocab_size = check_vocab_size(vocab_size)
        chunk_counts = collections.Counter(_split(text, pattern_of(pattern)))
        chunk_counts = {chunk.encode("utf-8", "replace"): n for chunk, n in chunk_counts.items()}
        merges = _bpe.train_merges(chunk_counts, vocab_size - N_BYTES)
        return cls(range(N_BYTES), merges, pattern=pattern)

    def with_special_tokens(self, names):
        """A copy with each name in `names` added as a special token (ids after the last one)."""
        special = dict(self.special_tokens)
        for name in names:
            if name not in special:
                special[name] = self.vocab_size + len(special) - len(self.special_tokens)
        return BPETokenizer(self.byte_ids, self.merges, self.merged_ids, special, self.pattern)

    # ---- using --------------------------------------------------------------------------------------

    @property
    def vocab_size(self):
        return len(self._token_bytes)

    unit = "token"          # what one id stands for, in reports; CharTokenizer's is "character"
    default_prompt = "\n"   # what generation starts from without a prompt (every byte is encodable)

    def _allowed(self, allowed_special):
        if allowed_special == "all":
            return set(self.special_tokens)
        if isinstance(allowed_special, str):
            raise TypeError(f'allowed_special must be "all" or a set of names, got the string {allowed_special!r}')
        allowed = set(allowed_special)
        unknown = sorted(allowed - set(self.special_tokens))
        if unknown:
            raise GptcoreError(f"{unknown[0]!r} is not a special token of this tokenizer "
                               f"(it has {sorted(self.special_tokens) or 'none'})")
        return allowed

    def encode(self, text, allowed_special=()):
        """str -> list of ids. Special tokens in the text are recognised only if allowed_special names
        them ("all", or a set of names); otherwise they are ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        ids, start = [], 0
        for match in self._special_regex.finditer(text):
            if match.group() in allowed:
                ids += self.encode_ordinary(text[start:match.start()])
                ids.append(self.special_tokens[match.group()])
                start = match.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_ordinary(self, text):
        """str -> list of ids, every character as text. The compiled twin of encode_reference."""
        try:
            if self.pattern == GPT2_PATTERN:
                return self._compiled.encode_gpt2(text, _class_table())
            return self._compiled.encode_chunks(regex.findall(self.pattern, text))
        except UnicodeEncodeError:
            # a lone surrogate ("\\ud800") is a Python str but not text UTF-8 can hold; like tiktoken,
            # we encode it as U+FFFD
            return self.encode_ordinary(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    def encode_reference(self, text):
        """encode_ordinary in plain Python: split_text, then encode_chunk_reference per chunk."""
        return [i for chunk in split_text(text, self.pattern)
                for i in encode_chunk_reference(chunk.encode("utf-8"), self.byte_ids, self.ranks)]

    def _check_ids(self, ids):
        ids = list(ids)
        for i in ids:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"token ids must be integers, got {type(i).__name__}")
            if not 0 <= i < self.vocab_size:
                raise GptcoreError(f"token id {int(i)} is outside the tokenizer's vocabulary [0, {self.vocab_size})")
        return ids

    def token_bytes(self, token_id):
        """The bytes one id stands for (a special token: its name in UTF-8)."""
        return self._token_bytes[self._check_ids([token_id])[0]]

    def decode_bytes(self, ids):
        return b"".join(self._token_bytes[i] for i in self._check_ids(ids))

    def decode(self, ids):
        """ids -> str. Bytes that do not form whole UTF-8 characters become U+FFFD, as in GPT-2."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def vocab_hash(self):
        """A hash of what the ids mean (checkpoint files record it, to catch mixed-up files)."""
        import hashlib
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def __eq__(self, other):
        return isinstance(other, BPETokenizer) and (self.byte_ids, self.merges, self.merged_ids,
                                                    self.special_tokens, self.pattern) == \
            (other.byte_ids, other.merges, other.merged_ids, other.special_tokens, other.pattern)

    def __hash__(self):
        return hash((tuple(self.merges), self.pattern))

    def __repr__(self):
        name = next((k for k, v in PATTERNS.items() if v == self.pattern), "custom")
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, pattern={name}, "
                f"special_tokens={sorted(self.special_tokens)})")

    # ---- Hugging Face's files -----------------------------------------------------------------------

    def _vocab_spelled(self):
        """{GPT-2 spelling: id} for the byte and merged tokens (special tokens are listed apart)."""
        vocab = {}
        for i in self.byte_ids + self.merged_ids:
            spelling = spell(self._token_bytes[i])
            if spelling in vocab:        # two merges made the same bytes: a vocab keyed by text cannot say so
                raise GptcoreError(f"tokens {vocab[spelling]} and {i} are the same bytes {self._token_bytes[i]!r}; "
                                   f"Hugging Face's files cannot hold two tokens with one spelling")
            vocab[spelling] = i
        return vocab

    def _hf_pipeline(self):
        """tokenizer.json as a dict: Hugging Face `tokenizers`' own layout."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        if self.pattern == GPT2_PATTERN:
            pre_tokenizer = byte_level
        else:
            pre_tokenizer = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {**byte_level, "use_regex": False}]}
        vocab = self._vocab_spelled()
        vocab.update(self.special_tokens)
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}
                             for name, i in sorted(self.special_tokens.items(), key=lambda item: item[1])],
            "normalizer": None, "pre_tokenizer": pre_tokenizer,
            "post_processor": {**byte_level, "trim_offsets": False},
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": dict(sorted(vocab.items(), key=lambda item: item[1])),
                      "merges": [[spell(self._token_bytes[a]), spell(self._token_bytes[b])]
                                 for a, b in self.merges]}}

    def tokenizer_config(self, model_max_length=None):
        """tokenizer_config.json (as a dict) for transformers' AutoTokenizer; the first special token
        (GPT-2's <|endoftext|>) is its bos, eos and unk token, as in GPT-2's own file."""
        config = hf_tokenizer_config(model_max_length, add_prefix_space=False)
        first_special = min(self.special_tokens, key=self.special_tokens.get, default=None)
        if first_special is not None:
            config.update(bos_token=first_special, eos_token=first_special, unk_token=first_special)
        return config

    def to_json(self):
        """The text of Hugging Face's tokenizer.json for this tokenizer (made once: checkpoints save
        it, and hash it, at every evaluation)."""
        if self._json is None:
            self._json = json.dumps(self._hf_pipeline(), ensure_ascii=False, indent=1) + "\n"
        return self._json

    def save(self, folder):
        """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json into `folder`
        (created if needed), each atomically. Hugging Face's libraries load the folder as it is."""
        os.makedirs(folder, exist_ok=True)
        vocab = self._vocab_spelled()
        vocab.update(self.special_tokens)
        merges = "#version: 0.2\n" + "".join(f"{spell(self._token_bytes[a])} {spell(self._token_bytes[b])}\n"
                                             for a, b in self.merges)
        config = self.tokenizer_config(1024)
        atomic_write(os.path.join(folder, "tokenizer.json"), self.to_json().encode("utf-8"))
        atomic_write(os.path.join(folder, "vocab.json"),
                     json.dumps(dict(sorted(vocab.items(), key=lambda item: item[1])),
                                ensure_ascii=False).encode("utf-8"))
        atomic_write(os.path.join(folder, "merges.txt"), merges.encode("utf-8"))
        atomic_write(os.path.join(folder, HF_TOKENIZER_CONFIG), (json.dumps(config, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------------------------------
# Readers: Hugging Face's vocab.json + merges.txt and tokenizer.json, and tiktoken's ranks files
# ----------------------------------------------------------------------------------------------------

HF_TOKENIZER_CONFIG = "tokenizer_config.json"       # transformers' file of tokenizer settings


def hf_tokenizer_config(model_max_length=None, **settings):
    """The tokenizer_config.json both of gptcore's tokenizers write: PreTrainedTokenizerFast reads
    tokenizer.json exactly as it is, and decoding keeps spaces as they are (transformers'
    clean_up_tokenization_spaces would remove the one before "." or "'s"). model_max_length: the
    model's context, left out without a model (transformers then assumes no limit)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **settings, "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def _read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        raise GptcoreError(f"tokenizer file {path} does not exist") from None
    except OSError as e:
        raise GptcoreError(f"cannot read tokenizer file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise GptcoreError(f"tokenizer file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_json(path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise GptcoreError(f"tokenizer file {path} is not valid JSON: {e}") from None


def from_spelled(vocab, merges, pattern, special_names, source):
    """A tokenizer from GPT-2-spelled files: vocab {spelling: id}, merges [(left spelling, right spelling)].
    Entries of vocab that are neither a byte nor made by a merge are special tokens (GPT-2's
    vocab.json lists <|endoftext|> that way); so are the names in special_names."""
    if not isinstance(vocab, dict) or not vocab:
        raise GptcoreError(f"{source}: the vocabulary must be a non-empty JSON object of token -> id")
    for token, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int):
            raise GptcoreError(f"{source}: the id of token {token!r} must be an integer, got {i!r}")
    byte_ids = []
    for byte in range(N_BYTES):
        spelling = BYTE_TO_UNICODE[byte]
        if spelling in vocab and spelling not in special_names:
            byte_ids.append(vocab[spelling])
        else:
            raise GptcoreError(f"{source}: no token for the byte {byte:#04x} ({spelling!r}): this is not a "
                               f"byte-level BPE vocabulary")
    pairs, merged_ids = [], []
    for rank, (left, right) in enumerate(merges):
        for name in (left, right):
            if name not in vocab:
                raise GptcoreError(f"{source}: merge {rank} ({left!r} {right!r}) names the token {name!r}, "
                                   f"which the vocabulary does not have")
        if left + right not in vocab:
            raise GptcoreError(f"{source}: merge {rank} ({left!r} {right!r}) makes {left + right!r}, "
                               f"which the vocabulary does not have")
        pairs.append((vocab[left], vocab[right]))
        merged_ids.append(vocab[left + right])
    made = set(byte_ids) | set(merged_ids)
    special = {token: i for token, i in vocab.items() if i not in made or token in special_names}
    return BPETokenizer(byte_ids, pairs, merged_ids, special, pattern, source=source)


def read_hf_vocab_merges(vocab_path, merges_path):
    """GPT-2's original pair of files (OpenAI's encoder.json is the same as vocab.json)."""
    vocab = _read_json(vocab_path)
    merges = []
    for n, line in enumerate(_read_text(merges_path).split("\n"), start=1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise GptcoreError(f"tokenizer file {merges_path}, line {n}: expected two tokens separated by "
                               f"one space, got {line[:80]!r}")
        merges.append(tuple(parts))
    return from_spelled(vocab, merges, "gpt2", set(), source=f"tokenizer files {vocab_path} and {merges_path}")


def _pattern_of_pre_tokenizer(pre, source):
    """Hugging Face's pre-tokenizer -> our pattern: ByteLevel with its regex is GPT-2's; a Split by a
    regex followed by ByteLevel without one is that regex."""
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) \
            and not pre.get("add_prefix_space", False):
        return GPT2_PATTERN
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if len(steps) == 2 and steps[0].get("type") == "Split" and isinstance(steps[0].get("pattern"), dict) \
                and "Regex" in steps[0]["pattern"] and steps[0].get("behavior") == "Isolated" \
                and not steps[0].get("invert") and steps[1].get("type") == "ByteLevel" \
                and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space", False):
            return steps[0]["pattern"]["Regex"]
    raise GptcoreError(f"{source}: gptcore reads byte-level BPE with a ByteLevel pre-tokenizer (or a regex Split "
                       f"then ByteLevel), not {json.dumps(pre)[:120]}")


def read_hf_tokenizer_json(path, data=None):
    """Hugging Face's tokenizer.json with a byte-level BPE model."""
    data = _read_json(path) if data is None else data
    source = f"tokenizer file {path}"
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model \
            or "merges" not in model:
        raise GptcoreError(f'{source}: expected a "model" of type "BPE" with "vocab" and "merges"')
    for option in ("continuing_subword_prefix", "end_of_word_suffix", "ignore_merges", "dropout"):
        if model.get(option):
            raise GptcoreError(f'{source}: the BPE model sets "{option}": {model[option]!r}, which gptcore '
                               f"does not implement (it would change the ids)")
    if data.get("normalizer") is not None:
        raise GptcoreError(f"{source}: gptcore does not apply normalizers, and this tokenizer has one "
                           f"({data['normalizer'].get('type')})")
    pattern = _pattern_of_pre_tokenizer(data.get("pre_tokenizer"), source)
    merges = []
    for n, item in enumerate(model["merges"]):
        parts = item.split(" ") if isinstance(item, str) else item
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise GptcoreError(f"{source}: merge {n} is {item!r}, not a pair of tokens")
        merges.append(tuple(parts))
    added = data.get("added_tokens") or []
    vocab = dict(model["vocab"]) if isinstance(model["vocab"], dict) else model["vocab"]
    if isinstance(vocab, dict):
        for token in added:
            vocab.setdefault(token.get("content"), token.get("id"))
    return from_spelled(vocab, merges, pattern, {token.get("content") for token in added}, source)


def read_tiktoken(path, pattern="gpt2", special_tokens=None):
    """A tiktoken ranks file: one `base64(token bytes) rank` per line. Ranks are ids, and a token's
    merge is found by running BPE on its bytes with the lower ranks only, until two tokens remain
    (the same recovery Hugging Face's converters use)."""
    source = f"tokenizer file {path}"
    ranks = {}
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line:
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            if len(parts) != 2:
                raise ValueError
        except (ValueError, IndexError):
            raise GptcoreError(f"{source}, line {n}: expected `base64 rank`, got {line[:80]!r}") from None
        ranks[token] = rank
    byte_ids = []
    for byte in range(N_BYTES):
        if bytes([byte]) not in ranks:
            raise GptcoreError(f"{source}: no token for the byte {byte:#04x}: this is not a byte-level BPE file")
        byte_ids.append(ranks[bytes([byte])])
    merges, merged_ids = [], []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], float("inf")))
            joined = parts[best] + parts[best + 1]
            if ranks.get(joined, float("inf")) >= rank:
                break
            parts[best:best + 2] = [joined]
        if len(parts) != 2 or parts[0] not in ranks or parts[1] not in ranks:
            raise GptcoreError(f"{source}: the token of rank {rank} ({token!r}) is not the merge of two "
                               f"lower-ranked tokens")
        merges.append((ranks[parts[0]], ranks[parts[1]]))
        merged_ids.append(rank)
    if special_tokens is None:
        special_tokens = {}
    return BPETokenizer(byte_ids, merges, merged_ids, special_tokens, pattern, source=source)


# ----------------------------------------------------------------------------------------------------
# The character classes the compiled scanner reads (built once, from the `regex` module itself)
# ----------------------------------------------------------------------------------------------------

_CLASSES = None


def _split(text, pattern):
    """split_text, compiled for GPT-2's pattern (gptcore._bpe.split_gpt2), `regex` for any other."""
    if pattern == GPT2_PATTERN:
        return _bpe.split_gpt2(text, _class_table())
    return regex.findall(pattern, text)


def _class_table():
    """uint8[0x110000]: bit LETTER for \\p{L}, NUMBER for \\p{N}, SPACE for \\s, per code point. We ask
    `regex` itself, over a string of every code point, so the scanner's classes are exactly the
    reference's (Python's unicodedata may follow another Unicode version than `regex` does)."""
    global _CLASSES
    if _CLASSES is None:
        everything = np.arange(0x110000, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
        table = np.zeros(0x110000, np.uint8)
        for bit, cls in ((_bpe.LETTER, r"\p{L}+"), (_bpe.NUMBER, r"\p{N}+"), (_bpe.SPACE, r"\s+")):
            for match in regex.finditer(cls, everything):
                table[match.start():match.end()] |= bit
        _CLASSES = table
    return _CLASSES
