"""gptcore.huggingface: what gptcore knows of Hugging Face's GPT-2 folder, read and written.

WHAT'S GOING ON HERE
====================

WHAT
  `huggingface-cli download gpt2` and transformers' `GPT2LMHeadModel.save_pretrained(DIR)` leave a
  folder like this one:

      config.json          {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768,
                            "n_positions": 1024, "vocab_size": 50257, "layer_norm_epsilon": 1e-05,
                            "activation_function": "gelu_new", ...}
      model.safetensors    wte.weight, wpe.weight, h.0.ln_1.weight, ..., ln_f.bias, with or without
                           a "transformer." prefix; maybe h.N.attn.bias / h.N.attn.masked_bias (the
                           causal mask, a buffer, not a parameter) and lm_head.weight
      tokenizer.json       (or the older vocab.json + merges.txt), read by gptcore.tokenizer
      pytorch_model.bin    (maybe) the same weights as a pickle, which gptcore never opens

  gptcore's own checkpoints (gptcore.checkpoint) are written in this layout too, so that
  transformers opens them: config_dict(config, tokenizer) is the config.json we write, and the
  tensors already carry GPT-2's names and layouts (gptcore.model.parameter_shapes: weights stored
  (in, out), as GPT-2's "Conv1D" keeps them, which is how transformers stores them too).

  read_config(path, data) turns a config.json into a GPTConfig, and refuses by name every setting
  that would make transformers compute something gptcore's model does not:
      activation_function        gptcore's GELU is the tanh approximation,
                                 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), which transformers
                                 calls "gelu_new" (GPT-2's) and "gelu_pytorch_tanh"; "gelu" (the exact
                                 erf form), "relu", ... are refused
      layer_norm_epsilon         gptcore's LayerNorm adds 1e-5 to the variance (LAYERNORM_EPS), GPT-2's
      n_inner                    the MLP is C -> 4C -> C: only null or 4 * n_embd
      scale_attn_weights         gptcore divides the scores by sqrt(hs): only true
      scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, add_cross_attention: only false
      tie_word_embeddings        the LM head is wte itself: only true
  A setting left out means transformers' default, which is GPT-2's, so gptcore takes it the same way.
  The sizes (n_layer, n_head, n_embd, n_positions, vocab_size) must be there. n_ctx (an older name
  that transformers no longer reads) and the training-only keys (the *_pdrop dropouts, initializer
  range, the summary_* keys of the double-heads model) do not change what the model computes.

  model_names(keys, source) maps the tensor names of a model.safetensors onto gptcore's: drops the
  "transformer." prefix and skips the mask buffers; lm_head.weight comes back apart, for the caller
  to check it equals wte.weight (GPT-2 ties them; a different head is refused, never silently tied).

  refuse_other_weights(folder) is the one line for a folder that has weights only in a format
  gptcore does not read (pytorch_model.bin is a pickle: loading it can run any code in it).
"""
import math
import os
import re

from gptcore.errors import GptcoreError
from gptcore.model import GPTConfig
from gptcore.reference import LAYERNORM_EPS

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")     # transformers' names for GPT-2's tanh GELU
PREFIX = "transformer."                              # GPT2LMHeadModel's name for its GPT2Model
LM_HEAD = "lm_head.weight"
# the causal mask buffers older transformers saved with the weights (h.0.attn.bias: (1, 1, T, T))
_MASK_BUFFER = re.compile(r"h\.[0-9]+\.attn\.(bias|masked_bias)")
# the sizes, in config.json's names -> GPTConfig's
SIZES = {"vocab_size": "vocab_size", "n_positions": "block_size", "n_layer": "n_layer", "n_head": "n_head",
         "n_embd": "n_embd"}
# the files of weights gptcore does not read, and what they are
OTHER_WEIGHTS = {"pytorch_model.bin": "a PyTorch pickle", "tf_model.h5": "TensorFlow weights",
                 "flax_model.msgpack": "Flax weights"}
SHARDED_INDEX = "model.safetensors.index.json"
MAX_DIMENSION = 2 ** 31 - 1          # every size: the kernels take them as C ints


def config_dict(config, tokenizer):
    """The config.json of a gptcore checkpoint: transformers' GPT2Config keys, with the values that
    say exactly what gptcore's model computes. bos/eos are <|endoftext|> when the tokenizer has it
    (GPT-2's), else null (a character vocabulary has no such token; transformers' default, 50256,
    would point outside it)."""
    special = getattr(tokenizer, "special_tokens", {}) or {}
    endoftext = special.get("<|endoftext|>")
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE],
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None,                                 # transformers' way of saying 4 * n_embd
        "activation_function": TANH_GELUS[0], "layer_norm_epsilon": LAYERNORM_EPS,
        # gptcore's model has no dropout in it; training with dropout is a setting of the run
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True,
        "bos_token_id": endoftext, "eos_token_id": endoftext, "initializer_range": 0.02, "use_cache": True,
    }


def _setting(path, data, key, default, allowed, wanted):
    """data[key] (or transformers' default), which must be one of `allowed`; else one line naming it."""
    value = data.get(key, default)
    if not any(type(value) is type(ok) and value == ok for ok in allowed):
        raise GptcoreError(f'{path}: "{key}": {value!r:.80} is not supported: gptcore\'s GPT-2 {wanted}')
    return value


def read_config(path, data):
    """A Hugging Face GPT-2 config.json (already parsed: `data`) -> GPTConfig. Raises GptcoreError
    naming the first key gptcore cannot honour."""
    values = {}
    for key, field in SIZES.items():
        if key not in data:
            raise GptcoreError(f'{path} has no "{key}" field')
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIMENSION:
            raise GptcoreError(f'{path}: "{key}" must be an integer in [1, {MAX_DIMENSION}], got {value!r:.80}')
        values[field] = value
    if values["n_embd"] % values["n_head"] != 0:
        raise GptcoreError(f'{path}: "n_embd" {values["n_embd"]} must be divisible by "n_head" {values["n_head"]}')
    activation = data.get("activation_function", TANH_GELUS[0])
    if activation not in TANH_GELUS:
        raise GptcoreError(f'{path}: "activation_function": {activation!r:.80} is not supported: gptcore\'s GELU '
                           f'is the tanh approximation ({" or ".join(map(repr, TANH_GELUS))})')
    epsilon = data.get("layer_norm_epsilon", LAYERNORM_EPS)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) \
            or epsilon != LAYERNORM_EPS:
        raise GptcoreError(f'{path}: "layer_norm_epsilon": {epsilon!r:.80} is not supported: gptcore\'s '
                           f'LayerNorm adds {LAYERNORM_EPS:g} to the variance')
    inner = data.get("n_inner")
    if inner is not None and (isinstance(inner, bool) or inner != 4 * values["n_embd"]):
        raise GptcoreError(f'{path}: "n_inner": {inner!r:.80} is not supported: gptcore\'s MLP has '
                           f'4 * n_embd = {4 * values["n_embd"]} hidden units (null or that number)')
    _setting(path, data, "scale_attn_weights", True, [True], "divides the attention scores by sqrt(head size)")
    _setting(path, data, "scale_attn_by_inverse_layer_idx", False, [False],
             "does not scale the attention scores by 1 / (layer index + 1)")
    _setting(path, data, "reorder_and_upcast_attn", False, [False],
             "computes attention in one order (the upcast variant is not implemented)")
    _setting(path, data, "add_cross_attention", False, [False], "has no cross-attention")
    _setting(path, data, "tie_word_embeddings", True, [True], "ties the LM head to the token embedding wte")
    try:
        return GPTConfig(**values)
    except ValueError as e:
        raise GptcoreError(f"{path}: {e}") from None


def model_names(keys, source):
    """The tensor names of a model.safetensors -> ({gptcore name: name in the file}, the name of
    lm_head.weight in the file or None). The "transformer." prefix is dropped and the causal mask
    buffers are skipped; two names that mean the same tensor are refused."""
    names, lm_head = {}, None
    for key in sorted(keys):
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if _MASK_BUFFER.fullmatch(name):
            continue
        if name == LM_HEAD:
            lm_head = key
            continue
        if name in names:
            raise GptcoreError(f"{source} holds both {names[name]!r} and {key!r}, one tensor under two names")
        names[name] = key
    return names, lm_head


def refuse_other_weights(folder):
    """One line for a folder without model.safetensors: why, and how to get one (or nothing to say)."""
    if os.path.isfile(os.path.join(folder, SHARDED_INDEX)):
        raise GptcoreError(f"{folder} holds a sharded checkpoint ({SHARDED_INDEX}); gptcore reads one "
                           f"model.safetensors: save it whole with transformers' save_pretrained(DIR, "
                           f"max_shard_size=\"100GB\")")
    for name, what in OTHER_WEIGHTS.items():
        if os.path.isfile(os.path.join(folder, name)):
            raise GptcoreError(
                f"{folder} has {name} ({what}) but no model.safetensors; gptcore never unpickles (loading a "
                f"pickle can run code) and reads safetensors only: download model.safetensors (e.g. "
                f"`huggingface-cli download gpt2 model.safetensors --local-dir {folder}`), or convert with "
                f"transformers: GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(DIR, "
                f"safe_serialization=True)")
