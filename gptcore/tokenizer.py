"""gptcore.tokenizer: text <-> token ids: one token per character, or byte-level BPE; load_tokenizer.

WHAT'S GOING ON HERE
====================

WHICH
  Two tokenizers share one interface: encode(text, allowed_special=()) -> ids, decode(ids) -> str,
  vocab_size, token_bytes(id), unit ("character" or "token", for reports) and save(folder).
    CharTokenizer   below: one token per character (the default of `gptcore train`);
    BPETokenizer    byte-level BPE (gptcore.bpe): GPT-2's own tokenizer, or one trained with
                    BPETokenizer.train(text, vocab_size, pattern="gpt2").
  load_tokenizer(path_or_name) is the one way to load either:
    "gpt2"                        GPT-2's vocabulary, shipped with the package (gptcore/assets/gpt2)
    a folder                      its tokenizer.json (gptcore's char file, or Hugging Face's), or
                                  Hugging Face's older vocab.json + merges.txt
    a tokenizer.json file         as in a folder
    a .tiktoken file              tiktoken's ranks (GPT-2's pattern unless told otherwise)

CHARACTERS (CharTokenizer)

  The model reads integers in [0, V), so text must become integers and back. We use the simplest
  tokenizer there is, the one nanoGPT's shakespeare_char uses: the vocabulary is the sorted set of
  characters in the training text, and a character's id is its place in that list.

      >>> tok = CharTokenizer.from_text("hello")
      >>> tok.chars
      ('e', 'h', 'l', 'o')
      >>> tok.encode("hole")
      array([1, 3, 2, 0])
      >>> tok.decode([1, 0, 2, 2, 3])
      'hello'

  On tinyshakespeare that is 65 characters (nanoGPT reports the same). GPT-2's real tokenizer is
  byte-pair encoding over 50,257 tokens; a character tokenizer makes sequences several times longer
  (so a block of T tokens sees less text), but it has no training step, no merges file, and nothing
  to get wrong, which is what we want here.
  The price: a character not seen in the training text has no id, and encode() says so rather than
  mapping it to some "unknown" token.

HOW
  encode() must keep up with the default corpus (the Python standard library: tens of millions of
  characters), so it has no per-character Python loop. Python's `str.encode("utf-32-le")` lays the
  text out as one uint32 code point per character; `np.frombuffer` views that as an array; one
  gather through a lookup table (code point -> id, -1 for "not in the vocabulary") turns it into
  ids. The table has an entry for every code point up to the largest in the vocabulary, plus one -1
  sentinel at the end that every larger code point is clipped onto. We go through the text in
  chunks so the temporary uint32 copy stays small next to the int64 result.

  decode() runs the same road backwards: ids -> code points (one gather) -> bytes -> str.

FILE
  `tokenizer.json` sits in each checkpoint folder next to the weights (gptcore.checkpoint writes it),
  in Hugging Face's own layout, so that `tokenizers.Tokenizer.from_file` and transformers'
  `AutoTokenizer.from_pretrained` read it and give the same ids (a BPE checkpoint's is gptcore.bpe's).
  A character vocabulary is written as a pipeline of three pieces:

      pre_tokenizer   Split on the regex [\\s\\S] (any one character, newlines too), each piece
                      kept alone ("Isolated"): every character becomes its own word
      model           WordLevel, vocab {character: id}, with an unk_token ("<unk>") that is not in
                      the vocabulary: a word-level model maps an unknown word to its unk_token, and
                      when that token has no id it raises, so a character gptcore refuses (encode,
                      above) Hugging Face refuses too, rather than dropping it or mapping it to some
                      character (a BPE model without merges and without an unknown token would
                      silently drop it)
      decoder         Fuse: the pieces are joined with nothing between them (a word-level
                      tokenizer's default decoding puts a space between words)

  and tokenizer_config.json says which class to load it with (PreTrainedTokenizerFast) and that
  decoding must not "clean up" spaces before punctuation. Older gptcore checkpoints hold
  {"type": "char", "vocab": ["\\n", " ", "!", ...]}, the characters in id order; they still load.
  Loading checks either file (a non-empty list of distinct one-character strings; for Hugging
  Face's layout, exactly the pipeline above) and raises GptcoreError naming what is wrong, because a
  hand-edited or damaged file would otherwise decode every generated token to the wrong character
  without any error at all.
"""
import json
import os

import numpy as np

from gptcore import bpe
from gptcore.bpe import BPETokenizer
from gptcore.errors import GptcoreError
from gptcore.files import atomic_write

TOKENIZER_TYPE = "char"                 # the "type" of older gptcore checkpoints' tokenizer.json
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = bpe.HF_TOKENIZER_CONFIG
# the Hugging Face pipeline of a character vocabulary (see FILE above)
CHAR_SPLIT = {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False}
CHAR_DECODER = {"type": "Fuse"}
CHAR_UNKNOWN = "<unk>"                  # never in a vocabulary of single characters
GPT2_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gpt2")
_CHUNK = 1 << 20          # characters encoded per step: a 4 MB uint32 temporary
_MAX_NAMED = 10           # how many offending characters an error message lists


def _names(chars):
    """'a', 'b' and 3 more: the first few characters, repr'd, for an error message."""
    chars = list(chars)
    shown = ", ".join(repr(c) for c in chars[:_MAX_NAMED])
    return shown + (f" and {len(chars) - _MAX_NAMED} more" if len(chars) > _MAX_NAMED else "")


def _check_vocab(vocab, source):
    """The vocabulary must be a non-empty list of distinct one-character strings that UTF-8 can
    store (a lone surrogate such as '\\ud800' is a Python str but not text: no file can hold it)."""
    if not isinstance(vocab, (list, tuple)):
        raise GptcoreError(f"{source}: the vocabulary must be a list of characters, "
                           f"got {type(vocab).__name__}")
    if len(vocab) == 0:
        raise GptcoreError(f"{source}: the vocabulary is empty")
    first_id = {}
    for i, c in enumerate(vocab):
        if not isinstance(c, str) or len(c) != 1:
            raise GptcoreError(f"{source}: vocab[{i}] is {c!r}, not a single character")
        if 0xD800 <= ord(c) <= 0xDFFF:
            raise GptcoreError(f"{source}: vocab[{i}] is the lone surrogate U+{ord(c):04X}, "
                               f"which is not a character UTF-8 can store")
        if c in first_id:
            raise GptcoreError(f"{source}: the character {c!r} appears twice in the vocabulary "
                               f"(ids {first_id[c]} and {i})")
        first_id[c] = i
    return tuple(vocab)


class CharTokenizer:
    """One token per character; ids are positions in `chars`. Build with from_text() or load()."""

    def __init__(self, chars, source="vocabulary"):
        self.chars = _check_vocab(chars, source)
        codes = np.array([ord(c) for c in self.chars], np.uint32)
        self._code_of_id = codes                                  # (V,) id -> code point
        # code point -> id, -1 where there is none; the last entry is the sentinel for larger codes
        self._id_of_code = np.full(int(codes.max()) + 2, -1, np.int32)
        self._id_of_code[codes] = np.arange(len(codes), dtype=np.int32)

    @classmethod
    def from_text(cls, text):
        """The vocabulary of `text`: its distinct characters, sorted by code point."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise GptcoreError("cannot build a tokenizer from empty text: there are no characters")
        return cls(sorted(set(text)), source="the text")

    @property
    def vocab_size(self):
        return len(self.chars)

    unit = "character"      # what one id stands for, in reports ("bits per character")

    @property
    def default_prompt(self):
        """What generation starts from without a prompt: a newline, or the first character if the
        vocabulary has no newline."""
        return "\n" if "\n" in self.chars else self.chars[0]

    def encode(self, text, allowed_special=()):
        """str -> int64 ids (len(text),). Raises GptcoreError naming characters not in the vocabulary.
        A character tokenizer has no special tokens, so allowed_special can only be empty (or "all")."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if allowed_special != "all" and (isinstance(allowed_special, str) or len(set(allowed_special))):
            raise GptcoreError(f"a character tokenizer has no special tokens, got allowed_special={allowed_special!r}")
        ids = np.empty(len(text), np.int64)
        sentinel = len(self._id_of_code) - 1
        unknown, n_unknown = set(), 0
        for start in range(0, len(text), _CHUNK):
            # "surrogatepass" lets a lone surrogate through as its code point; it is never in the
            # vocabulary (see _check_vocab), so it is reported below like any unknown character
            codes = np.frombuffer(text[start:start + _CHUNK].encode("utf-32-le", "surrogatepass"), np.uint32)
            chunk = self._id_of_code[np.minimum(codes, sentinel)]
            missing = chunk < 0
            if missing.any():
                n_unknown += int(missing.sum())
                unknown.update(np.unique(codes[missing]).tolist())
            ids[start:start + len(chunk)] = chunk
        if unknown:
            raise GptcoreError(
                f"the text has {len(unknown)} distinct character(s) not in the tokenizer's vocabulary "
                f"of {self.vocab_size} ({n_unknown} occurrence(s)): {_names(chr(c) for c in sorted(unknown))}")
        return ids

    def decode(self, ids):
        """Token ids (any 1-D sequence of integers) -> str. Raises GptcoreError for ids outside [0, V)."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return ""
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.ndim > 1:
            raise ValueError(f"decode takes one sequence of ids (1-D), got shape {ids.shape}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            raise GptcoreError(f"token id {low if low < 0 else high} is outside the tokenizer's "
                               f"vocabulary [0, {self.vocab_size})")
        return self._code_of_id[ids.reshape(-1)].tobytes().decode("utf-32-le")

    def token_bytes(self, token_id):
        """The UTF-8 bytes of one id's character."""
        return self.decode([token_id]).encode("utf-8")

    def vocab_hash(self):
        """A hash of the vocabulary itself (not of the file's bytes, which may be reformatted by hand);
        checkpoint files record it, to catch a tokenizer.json from another save."""
        import hashlib
        return hashlib.sha256(json.dumps(list(self.chars)).encode("utf-8")).hexdigest()

    # ---- the tokenizer.json file --------------------------------------------------------------------

    def to_json(self):
        """The text of the tokenizer.json gptcore writes: Hugging Face's layout (see FILE above)."""
        pipeline = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": CHAR_SPLIT, "post_processor": None, "decoder": CHAR_DECODER,
            "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(self.chars)},
                      "unk_token": CHAR_UNKNOWN}}
        # ensure_ascii=False keeps letters readable in the file; json still escapes "\n", "\t", ...
        return json.dumps(pipeline, ensure_ascii=False, indent=1) + "\n"

    def tokenizer_config(self, model_max_length=None):
        """tokenizer_config.json (as a dict) for transformers' AutoTokenizer: the class that reads
        tokenizer.json as it is, and no clean-up of spaces when decoding (it would change the text);
        model_max_length is the model's context, when there is a model."""
        return bpe.hf_tokenizer_config(model_max_length)

    @classmethod
    def from_json(cls, text, source="tokenizer JSON"):
        """Parse and check the text of a tokenizer.json; `source` names it in error messages."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GptcoreError(f"{source} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise GptcoreError(f"{source} must hold a JSON object, got {type(data).__name__}")
        if "model" in data:
            return cls.from_hf_pipeline(data, source)
        if "type" not in data:
            raise GptcoreError(f'{source} has no "type" field (expected "{TOKENIZER_TYPE}")')
        if data["type"] != TOKENIZER_TYPE:
            raise GptcoreError(f'{source} has "type": {data["type"]!r}; gptcore reads only '
                               f'"{TOKENIZER_TYPE}" tokenizers')
        if "vocab" not in data:
            raise GptcoreError(f'{source} has no "vocab" field')
        return cls(data["vocab"], source=source)

    @classmethod
    def from_hf_pipeline(cls, data, source):
        """Hugging Face's tokenizer.json of a character vocabulary, exactly as to_json writes it (a
        WordLevel model behind a one-character Split, a Fuse decoder); anything else would give other
        ids in Hugging Face than in gptcore, and is refused naming the piece."""
        model = data.get("model")
        if not isinstance(model, dict) or model.get("type") != "WordLevel":
            raise GptcoreError(f'{source}: expected a "model" of type "WordLevel" (a character vocabulary)')
        expected = {"pre_tokenizer": CHAR_SPLIT, "decoder": CHAR_DECODER, "normalizer": None,
                    "post_processor": None}
        for key, value in expected.items():
            if data.get(key) != value:
                raise GptcoreError(f'{source}: "{key}" must be {json.dumps(value)} for a character '
                                   f'vocabulary, got {json.dumps(data.get(key))[:120]}')
        if data.get("added_tokens"):
            raise GptcoreError(f'{source}: a character vocabulary has no "added_tokens"')
        vocab = model.get("vocab")
        if not isinstance(vocab, dict):
            raise GptcoreError(f'{source}: the WordLevel "vocab" must be an object of character -> id')
        ids = list(vocab.values())
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids) or sorted(ids) != list(range(len(ids))):
            raise GptcoreError(f'{source}: the WordLevel ids must be 0, 1, ..., {len(vocab) - 1}, each once')
        if model.get("unk_token") in vocab:
            raise GptcoreError(f'{source}: the unk_token {model["unk_token"]!r} is in the vocabulary, so Hugging '
                               f'Face would map unknown characters to it while gptcore refuses them')
        return cls(sorted(vocab, key=vocab.get), source=source)

    def save(self, folder):
        """Write folder/tokenizer.json and tokenizer_config.json, each atomically: a crash leaves the
        old file or the new one, never half."""
        os.makedirs(folder, exist_ok=True)
        atomic_write(os.path.join(folder, TOKENIZER_FILE), self.to_json().encode("utf-8"))
        atomic_write(os.path.join(folder, TOKENIZER_CONFIG_FILE),
                     (json.dumps(self.tokenizer_config(), indent=2) + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise GptcoreError(f"tokenizer file {path} does not exist") from None
        except OSError as e:
            raise GptcoreError(f"cannot read tokenizer file {path}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GptcoreError(f"tokenizer file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        return cls.from_json(text, source=f"tokenizer file {path}")

    def __eq__(self, other):
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __hash__(self):
        return hash(self.chars)

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size}, chars={_names(self.chars)})"


# ----------------------------------------------------------------------------------------------------
# load_tokenizer: every format, one entry point
# ----------------------------------------------------------------------------------------------------

def _load_json_file(path):
    """A tokenizer.json: a character vocabulary (gptcore's older {"type": "char", ...}, or Hugging
    Face's layout with a WordLevel model) or byte-level BPE (Hugging Face's layout, a BPE model)."""
    data = bpe._read_json(path)
    if isinstance(data, dict) and "model" in data and not (isinstance(data["model"], dict)
                                                           and data["model"].get("type") == "WordLevel"):
        return bpe.read_hf_tokenizer_json(path, data)
    return CharTokenizer.load(path)


def load_tokenizer(path_or_name, pattern="gpt2", special_tokens=None):
    """"gpt2", a folder (gptcore's or Hugging Face's), a tokenizer.json or a .tiktoken file -> a
    tokenizer. pattern and special_tokens are for .tiktoken files only, which hold neither (tiktoken's
    GPT-2 encoding adds {"<|endoftext|>": 50256})."""
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise TypeError(f"load_tokenizer takes a name or a path, got {type(path_or_name).__name__}")
    path = os.fspath(path_or_name)
    if path == "gpt2":
        path = GPT2_FOLDER
    if os.path.isdir(path):
        json_path = os.path.join(path, TOKENIZER_FILE)
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if os.path.isfile(json_path):
            return _load_json_file(json_path)
        if os.path.isfile(vocab) and os.path.isfile(merges):
            return bpe.read_hf_vocab_merges(vocab, merges)
        raise GptcoreError(f"tokenizer folder {path} has no {TOKENIZER_FILE}, nor vocab.json and merges.txt")
    if not os.path.exists(path):
        raise GptcoreError(f"tokenizer {path} does not exist (expected gpt2, a folder, a tokenizer.json "
                           f"or a .tiktoken file)")
    if path.endswith(".tiktoken"):
        return bpe.read_tiktoken(path, pattern, special_tokens)
    return _load_json_file(path)
