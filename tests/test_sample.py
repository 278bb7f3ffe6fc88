"""gptcore.sample.next_token on its own: the distribution it draws from, against one computed by hand.

WHAT'S GOING ON HERE

  WHAT   next_token(logits, rng, temperature, top_k, top_p) draws one token id. We check each knob:
           temperature 0 is argmax; top_k=1 is greedy at any temperature; top_p keeps exactly the
           nucleus (the smallest set of most likely tokens whose mass reaches top_p), including the
           boundary where the mass equals top_p; top_k is applied before top_p; temperature T draws
           from softmax(logits / T); the same seed gives the same draws; bad settings raise.
  HOW    next_token does not expose the distribution it filters, so we draw N_DRAWS times from one
         seeded generator and compare each token's frequency with the probability we computed by
         hand (renormalised over the nucleus). A token outside the nucleus must never appear.
  HOW THE TOLERANCES ARE SET
         A frequency over n independent draws of a token of probability p has standard error
         sqrt(p (1 - p) / n): at n = 20,000 and p = 0.5 that is 0.0035. We allow 5 standard errors
         (a correct sampler fails that about once in 1.7 million comparisons, should the seed change);
         the seeds are fixed, so the tests are deterministic anyway. A nucleus with one token too many
         draws a token that must never appear; one too few never draws a token of probability 0.05
         or more, whose frequency then lies 32 standard errors or more from its probability.
"""
import numpy as np
import pytest

from gptcore import GPT, GPTConfig
from gptcore.errors import GptcoreError
from gptcore.sample import check_sampling, generate, next_token

N_DRAWS = 20_000
STANDARD_ERRORS = 5


def frequencies(logits, n=N_DRAWS, seed=0, **settings):
    """How often each token id comes out of n draws of next_token from one seeded generator."""
    rng = np.random.default_rng(seed)
    draws = [next_token(logits, rng, **settings) for _ in range(n)]
    return np.bincount(draws, minlength=len(logits)) / n


def assert_frequencies_match(freqs, expected, n=N_DRAWS):
    """Tokens of probability 0 never drawn; every other frequency within 5 standard errors of its p."""
    expected = np.asarray(expected, np.float64)
    assert expected.sum() == pytest.approx(1.0, abs=1e-12), "the hand-computed distribution must sum to 1"
    outside = np.flatnonzero((expected == 0) & (freqs > 0))
    assert outside.size == 0, f"drew tokens {outside.tolist()}, which lie outside; frequencies {freqs}"
    bound = STANDARD_ERRORS * np.sqrt(expected * (1 - expected) / n)
    off = np.abs(freqs - expected) > bound
    assert not off.any(), (f"frequencies {np.round(freqs, 4)}, expected {np.round(expected, 4)} "
                           f"(+- {np.round(bound, 4)})")


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


# Four tokens of probability 0.15, 0.5, 0.05, 0.3 (the most likely one is not token 0, so a sampler
# that confused ranks with token ids would show). Sorted: 0.5, 0.3, 0.15, 0.05, with cumulative mass
# 0.5, 0.8, 0.95, 1.0.
PROBS = np.array([0.15, 0.5, 0.05, 0.3])
LOGITS = np.log(PROBS).astype(np.float32)          # as the model gives them: float32


def test_temperature_zero_returns_the_argmax_whatever_the_seed():
    for seed in range(5):
        assert next_token(LOGITS, np.random.default_rng(seed), temperature=0) == 1
    # top_k and top_p cannot change the most likely token
    assert next_token(LOGITS, np.random.default_rng(0), temperature=0, top_k=3, top_p=0.2) == 1


def test_temperature_zero_with_tied_maxima_returns_one_of_them_whatever_the_seed():
    logits = np.array([0.0, 2.0, -1.0, 2.0, 1.0], np.float32)
    picks = {next_token(logits, np.random.default_rng(seed), temperature=0) for seed in range(10)}
    assert len(picks) == 1 and picks <= {1, 3}, f"greedy picked {picks}"


@pytest.mark.parametrize("temperature", [0.1, 1.0, 2.0, 100.0])
def test_top_k_of_one_is_greedy_at_any_temperature(temperature):
    rng = np.random.default_rng(0)
    draws = {next_token(LOGITS, rng, temperature=temperature, top_k=1) for _ in range(200)}
    assert draws == {1}


def nucleus(probs, top_p):
    """The renormalised nucleus, by hand: walk down the sorted probabilities until they add up to top_p."""
    kept, mass = np.zeros_like(probs), 0.0
    for i in np.argsort(-probs):
        if mass >= top_p:
            break
        kept[i] = probs[i]
        mass += probs[i]
    return kept / kept.sum()


# top_p values sit well away from the cumulative masses 0.5, 0.8, 0.95, so rounding cannot move a token
# across the edge; the boundary itself is the next test.
@pytest.mark.parametrize("top_p, expected", [
    (0.3, [0, 1, 0, 0]),                                  # 0.5 alone reaches 0.3
    (0.7, [0, 0.5 / 0.8, 0, 0.3 / 0.8]),                  # 0.5 + 0.3
    (0.9, [0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95]),      # 0.5 + 0.3 + 0.15
    (0.97, PROBS),                                        # 0.95 < 0.97: every token
    (1.0, PROBS),                                         # no filtering
])
def test_top_p_draws_from_exactly_the_renormalised_nucleus(top_p, expected):
    np.testing.assert_allclose(nucleus(PROBS, top_p), expected, rtol=1e-12)   # the table agrees with the walk
    assert_frequencies_match(frequencies(LOGITS, top_p=top_p), expected)


def test_top_p_equal_to_the_mass_of_the_first_tokens_keeps_just_those():
    # probabilities 0.5, 0.25, 0.25 are exact in float64 (we check), so the mass of the two most likely
    # tokens is exactly 0.75: the smallest set that reaches top_p = 0.75 has two tokens, and a third
    # one appears only once top_p is above 0.75. Tokens 1 and 2 tie, so the nucleus holds either.
    logits = np.log([0.5, 0.25, 0.25])
    assert softmax(logits).tolist() == [0.5, 0.25, 0.25]
    freqs = frequencies(logits, top_p=0.75)
    drawn = np.flatnonzero(freqs)
    assert drawn.size == 2 and drawn[0] == 0, f"frequencies {freqs}: the nucleus is token 0 and one other"
    expected = np.zeros(3)
    expected[drawn] = [2 / 3, 1 / 3]
    assert_frequencies_match(freqs, expected)
    assert_frequencies_match(frequencies(logits, top_p=0.75 + 1e-9), [0.5, 0.25, 0.25])


def test_top_k_is_applied_before_top_p_and_top_p_sees_the_renormalised_top_k():
    # probabilities 0.4, 0.3, 0.2, 0.1. top_k=3 leaves 0.4, 0.3, 0.2, renormalised to 4/9, 3/9, 2/9
    # (cumulative 0.444, 0.778); top_p = 0.75 then keeps the first two. On the full distribution
    # (cumulative 0.4, 0.7) the same top_p would keep three: the order of the knobs shows.
    logits = np.log([0.1, 0.3, 0.4, 0.2]).astype(np.float32)
    assert_frequencies_match(frequencies(logits, top_k=3, top_p=0.75), [0, 3 / 7, 4 / 7, 0])
    assert_frequencies_match(frequencies(logits, top_k=3), [0, 3 / 9, 4 / 9, 2 / 9])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_t_draws_from_softmax_of_logits_over_t(temperature):
    logits = np.log([0.6, 0.25, 0.1, 0.05]).astype(np.float32)
    # at T = 2 the probabilities become 0.43, 0.27, 0.17, 0.12; at T = 0.5, 0.83, 0.14, 0.02, 0.01
    expected = softmax(logits.astype(np.float64) / temperature)
    assert_frequencies_match(frequencies(logits, temperature=temperature), expected)


def test_the_same_seed_gives_the_same_draws_and_other_seeds_differ():
    logits = np.zeros(10, np.float32)                  # uniform: two seeds agree 50 times with p = 1e-50

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [next_token(logits, rng, top_k=8, top_p=0.9) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


GOOD_SETTINGS = dict(temperature=1.0, top_k=None, top_p=None, max_new_tokens=1)

BAD_SETTINGS = [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-3), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
]
BAD_IDS = [",".join(f"{k}={v!r}" for k, v in change.items()) for change, _ in BAD_SETTINGS]


@pytest.mark.parametrize("change, name", BAD_SETTINGS, ids=BAD_IDS)
def test_check_sampling_raises_gptcore_error_naming_the_bad_setting(change, name):
    with pytest.raises(GptcoreError, match=name):
        check_sampling(**{**GOOD_SETTINGS, **change})


def test_check_sampling_accepts_the_edges_of_every_range():
    check_sampling(temperature=0.0, top_k=1, top_p=1.0, max_new_tokens=0)
    check_sampling(temperature=1e-6, top_k=10**6, top_p=1e-6, max_new_tokens=10)


@pytest.mark.parametrize("change, name", BAD_SETTINGS, ids=BAD_IDS)
def test_generate_checks_its_settings_before_it_yields_a_token(change, name):
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4), seed=0)
    with pytest.raises(GptcoreError, match=name):
        next(generate(model, [0], **{**GOOD_SETTINGS, **change}))
