"""gptcore.machine's measurements and their cache, and the efficiency train and generate report with them.

WHAT'S GOING ON HERE
  WHAT   The cache: a round trip, each staleness key (CPU, threads, the kernels' file, the sizes),
         corrupt and unwritable caches (a note, never a crash), remeasure. The arithmetic of the
         measurements, under a fake clock. The cost models against counts taken independently from
         the kernel calls a step makes: GPT.flops_per_token from every matmul and attention call of
         a training step, GPT.generation_bytes_per_token from every weight and KV row a generated
         token's kernels read, sample.context_lengths from the contexts generate() really uses.
         Through the command line: MFU in the log line and in metrics.jsonl, consistent with
         tokens_per_sec, flops_per_token and the cached peak; --remeasure-machine; generate's
         roofline line; `gptcore machine`.
  HOW    Every test has a cache folder of its own (XDG_CACHE_HOME in tmp_path); tests/conftest.py
         already keeps the whole session out of the real ~/.cache and sets GPTCORE_MACHINE_QUICK, so
         a real measurement takes milliseconds. Where a number must be known, the test writes the
         cache itself or replaces the measurement with a stub that counts its calls.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gptcore import compiled, machine
from gptcore.checkpoint import load_model
from gptcore.kernels import get_num_threads, set_num_threads
from gptcore.model import GPT, GPTConfig
from gptcore.sample import context_lengths, generate
from test_cli import ENV, TINY, metrics, ok, python_like_text

BABY = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


@pytest.fixture
def stub_measurements(monkeypatch):
    """machine's two measurements replaced by stubs returning 1e9 * (their call number): -> the list
    of calls made, by quantity."""
    calls = []
    def stub(quantity):
        def measure():
            calls.append(quantity)
            return 1e9 * len(calls)
        return measure
    monkeypatch.setattr(machine, "measure_matmul_peak", stub(machine.MATMUL))
    monkeypatch.setattr(machine, "measure_read_bandwidth", stub(machine.BANDWIDTH))
    return calls


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = get_num_threads()
    yield
    set_num_threads(before)


# ----------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------

def test_cache_lives_under_xdg_cache_home_or_dot_cache(cache_home, monkeypatch):
    assert machine.cache_path() == str(cache_home / "gptcore" / "machine.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/some/home")
    assert machine.cache_path() == "/some/home/.cache/gptcore/machine.json"


def test_a_measurement_is_cached_and_read_back_without_measuring_again(cache_home, stub_measurements):
    notes = []
    assert machine.matmul_peak(log=notes.append) == 1e9
    assert machine.matmul_peak(log=notes.append) == 1e9
    assert machine.read_bandwidth(log=notes.append) == 2e9
    assert machine.read_bandwidth(log=notes.append) == 2e9
    assert stub_measurements == [machine.MATMUL, machine.BANDWIDTH] and notes == []
    saved = json.loads((cache_home / "gptcore" / "machine.json").read_text())
    assert saved["format"] == machine.FORMAT
    [entry] = saved["measurements"]                    # both quantities in one entry, under its key
    assert {name: entry[name] for name in machine.staleness_key()} == machine.staleness_key()
    assert entry[machine.MATMUL] == 1e9 and entry[machine.BANDWIDTH] == 2e9
    assert machine.is_cached(machine.MATMUL) and machine.is_cached(machine.BANDWIDTH)


def test_remeasure_measures_again_and_replaces_the_cached_number(cache_home, stub_measurements):
    assert machine.matmul_peak() == 1e9
    assert machine.matmul_peak(remeasure=True) == 2e9
    assert machine.matmul_peak() == 2e9
    assert stub_measurements == [machine.MATMUL, machine.MATMUL]


def test_another_thread_count_is_measured_on_its_own_and_both_are_kept(cache_home, stub_measurements, threads):
    set_num_threads(1)
    assert machine.matmul_peak() == 1e9
    set_num_threads(2)
    assert machine.matmul_peak() == 2e9
    set_num_threads(1)
    assert machine.matmul_peak() == 1e9                # still cached
    assert len(stub_measurements) == 2


def test_a_rebuilt_kernels_file_makes_the_cache_stale(cache_home, stub_measurements, monkeypatch, tmp_path):
    built = tmp_path / "_kernels.so"
    built.write_bytes(b"one build")
    monkeypatch.setattr(compiled, "KERNELS_FILE", str(built))
    assert machine.matmul_peak() == 1e9
    assert machine.matmul_peak() == 1e9
    built.write_bytes(b"another build")                # a rebuild: another size and modification time
    assert machine.matmul_peak() == 2e9
    os.utime(built, ns=(0, 0))                         # the same size, another modification time
    assert machine.matmul_peak() == 3e9


def test_another_cpu_or_quick_sizes_make_the_cache_stale(cache_home, stub_measurements, monkeypatch):
    assert machine.matmul_peak() == 1e9
    monkeypatch.setattr(machine, "cpu_name", lambda: "Some Other CPU")
    assert machine.matmul_peak() == 2e9
    monkeypatch.setenv(machine.QUICK_ENV, "0")         # full sizes: never the quick numbers
    assert machine.matmul_peak() == 3e9
    assert len(stub_measurements) == 3


@pytest.mark.parametrize("content", [
    b"\x00\xff garbage", b'{"format": "gptcore machine measurements 1", "measurements": [', b"[1, 2, 3]",
    b'{"format": "something else", "measurements": []}',
    b'{"format": "gptcore machine measurements 1", "measurements": [{"cpu": "x"}]}',
    b"[" * 100_000,
], ids=["binary", "cut-short", "a-list", "another-format", "entry-without-key", "deeply-nested"])
def test_a_corrupt_cache_is_measured_again_with_a_one_line_note_and_replaced(cache_home, stub_measurements, content):
    path = cache_home / "gptcore" / "machine.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    notes = []
    assert machine.matmul_peak(log=notes.append) == 1e9
    assert len(notes) == 1 and "\n" not in notes[0] and str(path) in notes[0] and "measuring again" in notes[0]
    assert json.loads(path.read_text())["measurements"][0][machine.MATMUL] == 1e9     # replaced
    notes.clear()
    assert machine.matmul_peak(log=notes.append) == 1e9 and notes == []


@pytest.mark.parametrize("bad", [-1.0, 0, "fast", None, True, float("nan")])
def test_a_cached_number_that_is_not_a_positive_finite_number_is_measured_again(cache_home, stub_measurements, bad):
    path = cache_home / "gptcore" / "machine.json"
    path.parent.mkdir(parents=True)
    entry = {**machine.staleness_key(), machine.MATMUL: bad}
    path.write_text(json.dumps({"format": machine.FORMAT, "measurements": [entry]}))
    notes = []
    assert machine.matmul_peak(log=notes.append) == 1e9
    assert len(notes) == 1


def test_a_cache_folder_that_cannot_be_written_is_a_note_and_the_number_still_comes(tmp_path, monkeypatch,
                                                                                  stub_measurements):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    notes = []
    assert machine.matmul_peak(log=notes.append) == 1e9
    assert len(notes) == 1 and "cannot write" in notes[0]


def test_the_cache_keeps_the_newest_entries_only(cache_home, stub_measurements, monkeypatch):
    for i in range(machine.MAX_ENTRIES + 3):
        monkeypatch.setattr(machine, "cpu_name", lambda i=i: f"cpu {i}")
        machine.matmul_peak()
    entries = json.loads((cache_home / "gptcore" / "machine.json").read_text())["measurements"]
    assert [e["cpu"] for e in entries] == [f"cpu {i}" for i in range(3, machine.MAX_ENTRIES + 3)]


# ----------------------------------------------------------------------------------------------------
# The measurements
# ----------------------------------------------------------------------------------------------------

class _Clock:
    """time.perf_counter advancing one second per call: every timed call takes exactly 1 s."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def test_the_peak_is_the_best_product_s_two_flops_per_term_per_second(monkeypatch):
    monkeypatch.setattr(machine.time, "perf_counter", _Clock())
    shapes = ((8, 16, 32), (4, 4, 4))
    assert machine.measure_matmul_peak(shapes, repeats=2) == 2 * 8 * 16 * 32


def test_the_bandwidth_is_the_buffer_s_bytes_per_second(monkeypatch):
    monkeypatch.setattr(machine.time, "perf_counter", _Clock())
    assert machine.measure_read_bandwidth(1 << 20) == 1 << 20


def test_real_measurements_are_positive_and_finite():
    assert np.isfinite(machine.measure_matmul_peak()) and machine.measure_matmul_peak() > 0
    assert np.isfinite(machine.measure_read_bandwidth()) and machine.measure_read_bandwidth() > 0


def test_the_docstring_s_count_of_the_peak_s_flops_is_true():
    total = sum(2 * N * IC * OC * (machine.REPEATS + 1) for N, IC, OC in machine.PEAK_SHAPES)
    assert round(total / 1e9) == 48 and "48 GFLOP" in machine.__doc__
    assert machine.BANDWIDTH_BYTES == 256 * 2**20 and "256 MB" in machine.__doc__


# ----------------------------------------------------------------------------------------------------
# The cost models, against counts taken from the kernel calls
# ----------------------------------------------------------------------------------------------------

def _count_calls(monkeypatch, counts):
    """Wrap compiled's matmul and attention kernels to add each call's FLOPs to counts."""
    def rows(a):
        return a.size // a.shape[-1]

    def matmul_forward(inp, weight, bias=None, *, out, weight_transposed=False):
        counts["matmul"] += 2 * rows(inp) * weight.size               # a multiply-add per (row, weight)
        return original["matmul_forward"](inp, weight, bias, out=out, weight_transposed=weight_transposed)

    def matmul_backward(d_out, inp, weight, **kwargs):
        counts["matmul"] += 4 * rows(inp) * weight.size               # d_inp and d_weight
        return original["matmul_backward"](d_out, inp, weight, **kwargs)

    def attention_forward(qkv, n_head, **kwargs):
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        counts["attention"] += 4 * B * T * T * C                      # q.k and att@v, the whole square
        return original["attention_forward"](qkv, n_head, **kwargs)

    def attention_backward(d_out, qkv, *args, **kwargs):
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        counts["attention"] += 8 * B * T * T * C                      # twice the forward's
        return original["attention_backward"](d_out, qkv, *args, **kwargs)

    original = {}
    for function in (matmul_forward, matmul_backward, attention_forward, attention_backward):
        original[function.__name__] = getattr(compiled, function.__name__)
        monkeypatch.setattr(compiled, function.__name__, function)


@pytest.mark.parametrize("config", [BABY, GPTConfig(vocab_size=7, block_size=5, n_layer=2, n_head=3, n_embd=9)],
                         ids=["baby", "awkward"])
def test_flops_per_token_is_what_a_training_step_s_matmuls_and_attention_do(monkeypatch, config):
    model = GPT(config, seed=0)
    B, T = 3, config.block_size
    idx = np.random.default_rng(0).integers(0, config.vocab_size, (B, T))
    counts = {"matmul": 0, "attention": 0}
    _count_calls(monkeypatch, counts)
    model.forward(idx, idx)
    model.backward()
    # 6 N counts the biases and LayerNorm gains as if each took part in a product; the matmuls'
    # weights are exactly what the step multiplied
    gains_and_biases = sum(p.size for name, p in model.params.items() if p.ndim == 1)
    assert counts["matmul"] == 6 * B * T * (model.num_parameters - model.params["wpe.weight"].size
                                            - gains_and_biases)
    assert model.flops_per_token() * B * T == counts["matmul"] + counts["attention"] + 6 * B * T * gains_and_biases
    if config == BABY:                                                 # the docstring's "1% of N"
        assert gains_and_biases < 0.01 * (model.num_parameters - model.params["wpe.weight"].size)


def test_generation_bytes_per_token_is_what_a_cached_token_s_kernels_read(monkeypatch):
    config = BABY
    model = GPT(config, seed=0)
    cache = model.new_kv_cache()
    model.forward_cached(np.arange(10).reshape(1, 10), cache)            # a prompt of 10 tokens
    read = {"bytes": 0}
    def wrap(name, nbytes):
        original = getattr(compiled, name)
        def counted(*args, **kwargs):
            read["bytes"] += nbytes(*args, **kwargs)
            return original(*args, **kwargs)
        monkeypatch.setattr(compiled, name, counted)
    C = config.n_embd
    wrap("matmul_forward", lambda inp, weight, bias=None, **_: weight.nbytes + (0 if bias is None else bias.nbytes))
    wrap("layernorm_forward", lambda x, weight, bias, **_: weight.nbytes + bias.nbytes)
    # one new query at `start` reads the key and value rows of positions 0..start
    wrap("attention_forward_cached", lambda qkv, start, end, n_head, **_: 4 * 2 * C * end)
    wrap("embedding_forward", lambda idx, wte, wpe, **_: 4 * 2 * C)      # a row of each
    model.forward_cached(np.array([[3]]), cache)                         # the 11th position
    assert read["bytes"] == model.generation_bytes_per_token(11)


def test_context_lengths_are_the_windows_generate_really_uses(monkeypatch):
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=4)
    model = GPT(config, seed=0)
    seen = []
    forward_cached = model.forward_cached
    def recording(idx, kv_cache):
        logits = forward_cached(idx, kv_cache)
        seen.append(kv_cache.length)                 # the positions the last new token attended over
        return logits
    monkeypatch.setattr(model, "forward_cached", recording)
    for prompt in ([1, 2, 3], list(range(11))):      # shorter and longer than the window
        seen.clear()
        list(generate(model, prompt, 20, temperature=0, seed=0))
        assert seen == context_lengths(len(prompt), 20, config.block_size)
        assert max(seen) == config.block_size and min(seen) <= config.block_size // 2 + 1     # it slid


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

def run(*args, cwd, cache_home, timeout=120):
    env = {**ENV, "XDG_CACHE_HOME": str(cache_home)}
    return subprocess.run([sys.executable, "-m", "gptcore", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_cache(cache_home, threads=1, **numbers):
    """A cache holding `numbers` for the key a subprocess with OMP_NUM_THREADS=threads computes."""
    key = {**machine.staleness_key(), "threads": threads}
    path = cache_home / "gptcore" / "machine.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": machine.FORMAT, "measurements": [{**key, **numbers}]}))
    return path


def cached(cache_home, quantity):
    [entry] = json.loads((cache_home / "gptcore" / "machine.json").read_text())["measurements"]
    return entry[quantity]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("machine")
    (folder / "corpus.txt").write_text(python_like_text(20_000))
    return folder


def train(corpus, cache_home, out, *flags):
    return ok(run("train", "--data", "corpus.txt", "--out", out, *[f for f in TINY if f != "--no-progress"],
                  "--max-iters", 6, "--log-interval", 2, "--eval-interval", 3, *flags, cwd=corpus,
                  cache_home=cache_home))


def test_train_reports_mfu_consistent_with_tokens_per_sec_and_flops_per_token(corpus, tmp_path):
    peak = 12345.0e6                                 # a cached peak: MFU must be relative to it
    write_cache(tmp_path, **{machine.MATMUL: peak})
    result = train(corpus, tmp_path, "mfu")
    assert "measuring" not in result.stdout
    assert re.search(r"^MFU: [\d.]+ MFLOP a token .* over a matmul peak of 12\.3 GFLOP/s on 1 threads$",
                     result.stdout, re.MULTILINE)
    model = load_model(corpus / "mfu")[0]
    records = metrics(corpus / "mfu")
    steps = [r for r in records if not r["eval"]]
    assert [r["step"] for r in steps] == [2, 4, 6]
    for record in steps:
        assert record["mfu"] == pytest.approx(record["tokens_per_sec"] * model.flops_per_token() / peak, rel=1e-12)
    assert all(r["mfu"] is None for r in records if r["eval"])
    shown = re.findall(r"^step \d+/6: .*, ([\d,]+) tokens/s, MFU ([\d,]+)%$", result.stdout, re.MULTILINE)
    assert [int(mfu.replace(",", "")) for _, mfu in shown] == [round(100 * r["mfu"]) for r in steps]


def test_train_measures_a_missing_peak_once_and_remeasure_machine_measures_it_again(corpus, tmp_path):
    first = train(corpus, tmp_path, "run1")
    assert "measuring this machine's matmul peak" in first.stdout
    measured = cached(tmp_path, machine.MATMUL)
    second = train(corpus, tmp_path, "run2")
    assert "measuring" not in second.stdout and cached(tmp_path, machine.MATMUL) == measured
    write_cache(tmp_path, **{machine.MATMUL: 1.0})   # a bogus number, as a busy machine might leave
    third = train(corpus, tmp_path, "run3", "--remeasure-machine")
    assert "measuring this machine's matmul peak" in third.stdout
    assert cached(tmp_path, machine.MATMUL) != 1.0
    # the flag is for this process only: resuming the run does not measure again
    write_cache(tmp_path, **{machine.MATMUL: 1.0})
    resumed = ok(run("train", "--out", "run3", "--resume", "--max-iters", 9, cwd=corpus, cache_home=tmp_path))
    assert "measuring" not in resumed.stdout and cached(tmp_path, machine.MATMUL) == 1.0


def test_a_corrupt_cache_costs_train_one_note_line_not_the_run(corpus, tmp_path):
    path = tmp_path / "gptcore" / "machine.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"{not json")
    result = train(corpus, tmp_path, "corrupt")
    assert result.stdout.count(str(path)) == 2        # the note, and where the new measurement goes
    assert "could not be read" in result.stdout and "Traceback" not in result.stderr
    assert cached(tmp_path, machine.MATMUL) > 0


def test_help_documents_remeasure_machine_and_the_machine_command(tmp_path):
    assert "--remeasure-machine" in ok(run("train", "--help", cwd=tmp_path, cache_home=tmp_path)).stdout
    assert "--remeasure" in ok(run("machine", "--help", cwd=tmp_path, cache_home=tmp_path)).stdout
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    assert "--remeasure-machine" in readme and "gptcore machine" in readme


def test_generate_prints_its_fraction_of_the_memory_roofline(corpus, tmp_path):
    train(corpus, tmp_path, "gen")
    bandwidth = 2.5e9
    write_cache(tmp_path, **{machine.BANDWIDTH: bandwidth})
    result = ok(run("generate", "--model", "gen", "--prompt", "def", "--max-new-tokens", 40, "--seed", 1,
                    cwd=corpus, cache_home=tmp_path))
    line = re.fullmatch(r"40 tokens in [\d.]+ s: ([\d,]+) tokens/s \(KV cache\), (\d+)% of the 2\.5 GB/s memory "
                        r"roofline \(([\d,]+) tokens/s at ([\d.]+) MB a token\)\n", result.stderr)
    assert line, result.stderr
    model = load_model(corpus / "gen")[0]
    contexts = context_lengths(3, 40, model.config.block_size)           # "def": 3 characters
    bytes_per_token = np.mean([model.generation_bytes_per_token(n) for n in contexts])
    assert float(line.group(4)) == pytest.approx(bytes_per_token / 1e6, abs=0.05)
    roofline = bandwidth / bytes_per_token
    assert int(line.group(3).replace(",", "")) == round(roofline)
    tokens_per_sec = int(line.group(1).replace(",", ""))
    assert abs(int(line.group(2)) - 100 * tokens_per_sec / roofline) <= 1        # both rounded


def test_machine_prints_the_cached_numbers_and_remeasure_replaces_them(tmp_path):
    write_cache(tmp_path, **{machine.MATMUL: 42.0e9, machine.BANDWIDTH: 7.5e9})
    result = ok(run("machine", "--threads", "1", cwd=tmp_path, cache_home=tmp_path))
    assert "matmul peak: 42.0 GFLOP/s (cached;" in result.stdout
    assert "memory read bandwidth: 7.5 GB/s (cached;" in result.stdout
    assert str(tmp_path / "gptcore" / "machine.json") in result.stdout
    result = ok(run("machine", "--threads", "1", "--remeasure", cwd=tmp_path, cache_home=tmp_path))
    assert result.stdout.count("(measured now;") == 2
    assert cached(tmp_path, machine.MATMUL) != 42.0e9 and cached(tmp_path, machine.BANDWIDTH) != 7.5e9
