"""What recording the training dynamics (gptcore.dynamics) costs: a recorded step next to a plain one.

WHAT'S GOING ON HERE
  gptcore train records the statistics of the step before each evaluation (train_step(run,
  record_dynamics=True)). Here the same run takes plain and recorded steps in turn, ROUNDS of each,
  interleaved so that the machine's noise hits both alike, and we compare the medians:

    recorded / plain      what one recorded step costs more than a plain one
    per step, amortized   ((eval_interval - 1) * plain + recorded) / eval_interval over plain: what
                          recording at every evaluation adds to a run's time per step

  for nanoGPT's CPU "baby GPT" (4 layers, 4 heads, n_embd 128, block_size 64, batch 12) with the
  default eval_interval. The second, what training per step costs more with recording on, must stay
  under 2%; the first is printed: a recorded step does a few passes over the weights and activations
  more than a plain one (a copy of the weights, sums of squares), which a small model's step notices.
  Run it with:

      python3 -m pytest bench/test_dynamics_bench.py -s
"""
import time

import numpy as np

from gptcore.train import TrainConfig, setup, train_step

ROUNDS = 40
WARMUP = 5
LIMIT = 1.02


def test_recording_the_dynamics_costs_under_two_percent_of_a_step(tmp_path):
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\n-0123456789"))
    (tmp_path / "text.txt").write_text("".join(rng.choice(alphabet, 200_000)))
    config = TrainConfig(data=str(tmp_path / "text.txt"), out=str(tmp_path / "run"), progress=False)
    run = setup(config, log=lambda *_: None)
    try:
        times = {False: [], True: []}
        for round_ in range(WARMUP + ROUNDS):
            for record in (False, True):
                started = time.perf_counter()
                train_step(run, record_dynamics=record)
                if round_ >= WARMUP:
                    times[record].append(time.perf_counter() - started)
    finally:
        run.lock.release()
    plain, recorded = np.median(times[False]), np.median(times[True])
    per_step = ((config.eval_interval - 1) * plain + recorded) / config.eval_interval
    print(f"\nbaby GPT, batch {config.batch_size} x {config.block_size}, medians of {ROUNDS} interleaved steps:")
    print(f"  plain step      {plain * 1e3:9.2f} ms")
    print(f"  recorded step   {recorded * 1e3:9.2f} ms   recorded / plain {recorded / plain:.4f}")
    print(f"  per step, amortized over eval_interval {config.eval_interval}: {per_step / plain:.5f} x plain")
    assert per_step / plain < LIMIT
