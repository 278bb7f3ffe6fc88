"""Build gptcore's compiled modules: the kernels (gptcore/_kernels.pyx), the byte-pair encoder
(gptcore/_bpe.pyx: GPT-2's pre-split and the merge loop, one thread, no OpenMP) and the matmul ladder
(gptcore/_ladder.pyx, the lesson's rungs; nothing in the model uses it).

WHAT'S GOING ON HERE
  Everything about *how* the kernels are compiled lives in this one file: the C compiler flags and the
  Cython directives, the same for every module. The .pyx files carry no `# cython:` directive lines, so
  nothing can silently override the switches below.

  Release build (the default): bounds, wraparound and None checks are off inside the compiled loops.
  The compiled code is reached through one module, gptcore/compiled.py, which checks nothing, so this
  is safe only because every caller of it checks first: gptcore/kernels.py, the API for users, checks
  every dtype, shape, stride, index and alias (with gptcore/validate.py) before it calls in;
  gptcore/model.py builds every buffer it passes from its config (GPTConfig checks that n_head
  divides n_embd) and checks the token ids, the targets and T <= block_size once per forward, in
  GPT.forward. gptcore/ladder.py checks the ladder's arguments the same way, with gptcore/validate.py.

  Debug build (GPTCORE_DEBUG=1): bounds and wraparound checks come back on, so an off-by-one in a kernel
  raises IndexError (reported through sys.unraisablehook from inside nogil helpers) instead of reading
  stray memory. CI runs the kernel tests against this build too.

  Compiler flags: -O3 -march=native by default, so the micro-kernels use the widest vector registers the
  machine has (AVX-512 where the CPU has it). Override with GPTCORE_CFLAGS="..." (e.g. "-O3 -mavx2 -mfma"
  for a build that runs on any x86-64 CPU with AVX2). -fopenmp is always added: the kernels' prange loops need it. We never use -ffast-math: it lets
  the compiler assume no NaN/inf exists, which would break the NaN checks the trainer relies on.
  Two flags from that family are safe, and we use them: -fno-math-errno (nobody reads errno after
  sqrtf, so sqrtf can be one instruction) and -fno-trapping-math (nobody inspects floating-point
  exception flags, so a compare-and-select such as `x if x < hi else hi` can be vectorized). Neither
  changes a single result.
"""
import os
import shlex

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("GPTCORE_DEBUG", "") not in ("", "0")
DEFAULT_CFLAGS = "-O3 -march=native -fno-math-errno -fno-trapping-math"
cflags = shlex.split(os.environ.get("GPTCORE_CFLAGS", DEFAULT_CFLAGS))
if DEBUG:
    cflags += ["-g"]

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "nonecheck": False,
    # C semantics for / and %: no Python-style ZeroDivisionError checks in the loops. The callers of
    # gptcore.compiled guarantee every divisor (n_head, N, C, T) is positive before they call in:
    # gptcore.kernels by its checks, gptcore.model by its config.
    "cdivision": True,
    "infer_types": False,
    "embedsignature": True,
}

extensions = [
    Extension(
        "gptcore._kernels",
        ["gptcore/_kernels.pyx"],
        extra_compile_args=cflags + ["-fopenmp"],
        extra_link_args=["-fopenmp"],
    ),
    Extension(
        "gptcore._bpe",
        ["gptcore/_bpe.pyx"],
        extra_compile_args=cflags,
    ),
    Extension(
        "gptcore._ladder",
        ["gptcore/_ladder.pyx"],
        extra_compile_args=cflags + ["-fopenmp"],
        extra_link_args=["-fopenmp"],
    ),
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, force=True))
