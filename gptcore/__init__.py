"""gptcore: a GPT-2-style transformer written from scratch, to read and to train on a CPU.

WHAT'S GOING ON HERE
====================
The package is layered, bottom to top; each module imports only modules listed before it:
  gptcore.errors     GptcoreError, the one exception the command line turns into a one-line message
  gptcore.files      writing files atomically (a kill at any instant leaves the old file or the new one)
  gptcore.validate   the argument checks, written once: arrays, shapes, integers, token ids
  gptcore._kernels   compiled Cython/OpenMP loops: every layer's forward and backward (no checks)
  gptcore.compiled   the one adapter over gptcore._kernels (the only module that imports it): the
                     kernels with gptcore.reference's signatures, and no checks, for callers that
                     build their own arrays (the model, the optimizers)
  gptcore.reference  the same functions again in plain Python loops: the oracle in tests, the baseline
                     in benchmarks, and a backend that runs a whole training step without compiled code
  gptcore.kernels    the checked public API: every function checks its arguments, then calls
                     gptcore.compiled
  gptcore.backends   "compiled" or "reference": which kernel module the model and optimizers use
  gptcore.model      GPT-2 itself: GPTConfig, GPT (forward, and the backward written by hand)
  gptcore.optim      AdamW, SGD, the cosine learning-rate schedule, gradient clipping
  gptcore.dropout    Dropout: which activations a training forward drops, from a hash, never stored
  gptcore._bpe       compiled byte-pair encoding: GPT-2's pre-split as a scanner, and the merge loop
  gptcore.bpe        byte-level BPE: the readable reference, BPETokenizer (GPT-2's tokenizer exactly,
                     or one trained), and the readers and writers of Hugging Face's and tiktoken's files
  gptcore.tokenizer  the character-level tokenizer, and load_tokenizer: the one way to load any tokenizer
  gptcore.data       reading a corpus, the train/validation split, random batches, evaluation windows
  gptcore.checkpoint saving and loading model folders (safetensors + JSON)
  gptcore.sample     sampling (temperature, top-k, top-p) with a KV cache
  gptcore.train      the training loop and the evaluation behind the command line
  gptcore.cli        the `gptcore` command: train, generate, eval, tokenize
  gptcore.ladder     the matmul optimisation ladder (gptcore._ladder): naive loop to micro-kernel

    from gptcore import GPT, GPTConfig, AdamW
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), seed=0)
    logits, loss = model.forward(idx, targets)
    AdamW(model.params, lr=1e-3).step(model.backward())
"""
from gptcore import kernels, reference
from gptcore.dropout import Dropout
from gptcore.kernels import get_num_threads, set_num_threads
from gptcore.model import GPT, GPTConfig
from gptcore.optim import SGD, AdamW, clip_grad_norm, cosine_lr

__all__ = ["GPT", "GPTConfig", "Dropout", "AdamW", "SGD", "clip_grad_norm", "cosine_lr", "kernels", "reference",
           "set_num_threads", "get_num_threads"]
__version__ = "0.1.0"
