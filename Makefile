# gptcore's commands. `make build` installs the package (compiling gptcore/_kernels.pyx) into the
# Python you run it with; `make test` adds the test tools (pytest, hypothesis, torch as an oracle),
# MPI (the mpi extra: mpi4py and the mpich wheel's mpiexec, which tests/test_distributed.py runs) and
# headless Chromium for the report page (see `browser`), and runs the whole suite. Both install what
# they need, so they work on a fresh clone.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: build test test-debug browser bench memory ladder asm clean

build:
	@echo "compiling gptcore/_kernels.pyx and installing gptcore into $$($(PYTHON) -c 'import sys; print(sys.prefix)') (about 30 s)..."
	$(PIP) install --quiet -e .
	@command -v pyenv >/dev/null 2>&1 && pyenv rehash || true

test: browser
	@echo "compiling gptcore/_kernels.pyx and installing gptcore with its test tools (pytest, hypothesis, torch CPU build) and MPI (mpi4py, mpich; for tests/test_distributed.py; about 40 s)..."
	$(PIP) install --quiet -e ".[test,mpi]"
	@command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
	$(PYTHON) -m pytest tests

# The browser tests/test_visualize.py opens report.html in: Debian's headless Chromium, installed with
# apt-get when it is missing and we are root with apt-get at hand. Otherwise we say why, and that test
# is skipped (it names the reason too); the rest of the suite runs either way.
browser:
	@if command -v chromium >/dev/null 2>&1; then \
	  echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser test (apt-get; a minute or two)..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	    || echo "warning: apt-get could not install chromium: the browser test will be skipped"; \
	else \
	  echo "note: chromium is not installed and apt-get is not usable as root here: the browser test will be skipped"; \
	fi

# The kernel tests (and the matmul ladder's and the byte-pair encoder's) again, against a build with bounds and wraparound checks
# compiled back in: an out-of-bounds index inside a kernel then raises (reported as an unraisable
# exception, which -W error turns into a failure) instead of reading stray memory. Rebuilds the release
# kernels afterwards.
test-debug:
	GPTCORE_DEBUG=1 $(PYTHON) setup.py --quiet build_ext --inplace
	$(PYTHON) -m pytest -W error::pytest.PytestUnraisableExceptionWarning tests/test_kernels.py tests/test_ladder.py tests/test_bpe.py; \
	status=$$?; $(PYTHON) setup.py --quiet build_ext --inplace; exit $$status

# Benchmarks. numpy (OpenBLAS) is the yardstick for matmul. Some environments set OPENBLAS_CORETYPE
# or OPENBLAS_L2_SIZE, which make OpenBLAS pick another (slower) kernel than the one it detects for
# the CPU; we unset them here, for this command only, so numpy is measured at its best.
bench:
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PYTHON) -m pytest bench --benchmark-warmup=on --benchmark-columns=median,iqr,rounds --benchmark-sort=name

# Peak memory (RSS) and time of one GPT-2 124M training step (B 4 x T 1024), gptcore side by side with
# Hugging Face transformers, each in its own process under /usr/bin/time -v (bench/memory_124m.py; each
# side needs ~10 GB, and takes minutes). `make memory ARGS=--quick` runs a small model in seconds.
memory:
	$(PYTHON) bench/memory_124m.py $(ARGS)

# The matmul optimisation ladder (gptcore/ladder.py): every rung, and numpy, in GFLOP/s at the model's
# shapes, as a markdown table. The OpenBLAS variables are unset for the same reason as in `bench`.
ladder:
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PYTHON) bench/ladder.py

# The generated C and the assembly gcc makes of it, to check the micro-kernel's inner loop is
# vbroadcastss + vfmadd231ps on vector registers: zmm with AVX-512, ymm with AVX2 (in the ladder too,
# from its micro-kernel rung on).
asm:
	$(PYTHON) setup.py --quiet build_ext --inplace
	mkdir -p build
	for module in _kernels _ladder; do \
	  gcc $$(sed -n 's/^DEFAULT_CFLAGS = "\(.*\)"/\1/p' setup.py) -fopenmp -S $$($(PYTHON) -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])") gptcore/$$module.c -o build/$$module.s \
	  && echo "vector FMAs in build/$$module.s: $$(grep -c 'vfmadd.*[yz]mm' build/$$module.s)" || exit 1; \
	done

clean:
	rm -rf build gptcore/_kernels.c gptcore/_ladder.c gptcore/*.so *.egg-info .pytest_cache .benchmarks
