"""edgevl.sampling against transformers' logits processors (torch is used here, in the test only)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from edgevl.generation import GenerationConfig
from edgevl.sampling import (apply_repetition_penalty, apply_temperature, sample_next, top_k_filter,
                             top_p_filter)

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")


def hf(processor, logits, ids=()):
    """Run one transformers processor on a single row, as generate() does."""
    input_ids = torch.tensor(np.asarray(ids, dtype=np.int64).reshape(1, -1))
    return processor(input_ids, torch.from_numpy(logits.copy())[None])[0].numpy()


def random_logits(rng, vocab, scale=3.0):
    return (rng.standard_normal(vocab) * scale).astype(np.float32)


@pytest.fixture(params=[(10, 0), (1000, 1), (32000, 2)], ids=["V10", "V1000", "V32000"])
def logits(request):
    vocab, seed = request.param
    return random_logits(np.random.default_rng(seed), vocab)


# ---- each processor, bit for bit ----

@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.1, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(logits, penalty):
    rng = np.random.default_rng(7)
    ids = rng.integers(0, logits.size, 40)
    ids = np.concatenate([ids, ids[:5]])  # repeats count once
    expected = hf(logits_process.RepetitionPenaltyLogitsProcessor(penalty), logits, ids)
    assert np.array_equal(apply_repetition_penalty(logits, ids, penalty), expected)


def test_repetition_penalty_crafted():
    logits = np.array([-2.0, -0.0, 0.0, 3.0, 1.5, -1.0], np.float32)
    ids = [0, 1, 2, 3, 3, 3]
    out = apply_repetition_penalty(logits, ids, 2.0)
    np.testing.assert_array_equal(out, [-4.0, -0.0, 0.0, 1.5, 1.5, -1.0])
    assert np.array_equal(out, hf(logits_process.RepetitionPenaltyLogitsProcessor(2.0), logits, ids))
    # ids past the lm_head vocab are ignored, as transformers does
    assert np.array_equal(apply_repetition_penalty(logits, [4, 6, 100], 2.0),
                          hf(logits_process.RepetitionPenaltyLogitsProcessor(2.0), logits, [4, 6, 100]))
    assert np.array_equal(apply_repetition_penalty(logits, [], 2.0), logits)


@pytest.mark.parametrize("temperature", [0.1, 0.7, 1.0, 1.3, 3.0])
def test_temperature_matches_transformers(logits, temperature):
    expected = hf(logits_process.TemperatureLogitsWarper(temperature), logits)
    assert np.array_equal(apply_temperature(logits, temperature), expected)


@pytest.mark.parametrize("top_k", [1, 2, 5, 50, 999, 10**6])
def test_top_k_matches_transformers(logits, top_k):
    expected = hf(logits_process.TopKLogitsWarper(top_k), logits)
    assert np.array_equal(top_k_filter(logits, top_k), expected)


@pytest.mark.parametrize("top_k", [1, 2, 3, 4, 5])
def test_top_k_ties_and_inf(top_k):
    # every score tied with the k-th largest is kept; -inf entries stay out
    logits = np.array([1.0, 2.0, 2.0, -np.inf, 3.0, 2.0, 0.5], np.float32)
    out = top_k_filter(logits, top_k)
    assert np.array_equal(out, hf(logits_process.TopKLogitsWarper(top_k), logits))
    if top_k in (2, 3, 4):
        np.testing.assert_array_equal(np.isfinite(out), [False, True, True, False, True, True, False])
    assert np.array_equal(top_k_filter(logits, 0), logits)  # 0 disables


def assert_top_p_matches(logits, top_p):
    """Kept sets must agree; a token may differ only where its cumulative probability sits within
    torch's float32 / approximate-exp rounding (1e-5 relative) of the 1 - top_p threshold."""
    ours = top_p_filter(logits, top_p)
    expected = hf(logits_process.TopPLogitsWarper(top_p), logits)
    kept = np.isfinite(ours)
    np.testing.assert_array_equal(ours[kept], logits[kept])
    differ = np.flatnonzero(kept != np.isfinite(expected))
    if differ.size:
        probs = np.exp(logits.astype(np.float64) - logits.max())
        probs /= probs.sum()
        cumulative = np.array([probs[logits <= logits[i]].sum() for i in differ])
        threshold = 1.0 - top_p
        assert differ.size <= 2 and np.all(np.abs(cumulative - threshold) <= 1e-5 * threshold), (
            f"top_p={top_p}: tokens {differ} differ away from the threshold")


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.7, 0.9, 0.95, 0.999, 1.0])
def test_top_p_matches_transformers_random(logits, top_p):
    if top_p == 1.0:  # generate() adds no TopPLogitsWarper at 1.0; ours is the identity
        assert np.array_equal(top_p_filter(logits, 1.0), logits)
    else:
        assert_top_p_matches(logits, top_p)


@pytest.mark.parametrize("top_p", [0.25, 0.5, 0.75, 0.7500001, 0.7499999, 0.3, 1e-9])
def test_top_p_edge_values_with_ties(top_p):
    # uniform over 4: probabilities are exactly 0.25, cumulative 0.25/0.5/0.75/1.0, so the
    # threshold 1 - top_p lands exactly on (or one float away from) a cumulative value; a token
    # whose cumulative equals the threshold is removed. Small n: torch's sort is stable there.
    logits = np.zeros(4, np.float32)
    out = top_p_filter(logits, top_p)
    assert np.array_equal(out, hf(logits_process.TopPLogitsWarper(top_p), logits))
    expected_kept = {0.25: 1, 0.5: 2, 0.75: 3, 0.7500001: 4, 0.7499999: 3, 0.3: 2, 1e-9: 1}
    if top_p in expected_kept:
        assert np.isfinite(out).sum() == expected_kept[top_p]
        assert np.isfinite(out[-1])  # ties: the stable order removes lower ids first


@pytest.mark.parametrize("top_p", [0.1, 0.4, 0.5, 0.6, 0.8, 0.9])
def test_top_p_crafted(top_p):
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.05, 0.25, 0.15], np.float32))
    logits = np.concatenate([logits, [-np.inf, 0.5, 0.5]]).astype(np.float32)
    assert np.array_equal(top_p_filter(logits, top_p), hf(logits_process.TopPLogitsWarper(top_p), logits))
    assert np.isfinite(top_p_filter(np.array([0.0, -np.inf, -np.inf], np.float32), 0.5)).sum() == 1


def test_filter_chain_matches_transformers_pipeline(logits):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, logits.size, 30)
    chain = logits_process.LogitsProcessorList([
        logits_process.RepetitionPenaltyLogitsProcessor(1.2), logits_process.TemperatureLogitsWarper(0.7),
        logits_process.TopKLogitsWarper(min(40, logits.size)), logits_process.TopPLogitsWarper(0.9)])
    expected = hf(chain, logits, ids)
    ours = top_p_filter(top_k_filter(apply_temperature(apply_repetition_penalty(logits, ids, 1.2), 0.7), 40), 0.9)
    assert np.array_equal(ours, expected)


def test_functions_do_not_mutate_input(logits):
    original = logits.copy()
    for out in (apply_repetition_penalty(logits, [0, 1, 2], 1.5), apply_temperature(logits, 0.5),
                top_k_filter(logits, 3), top_p_filter(logits, 0.5)):
        assert out is not logits
    sample_next(logits, GenerationConfig(do_sample=True, top_k=5, top_p=0.8, repetition_penalty=1.3, temperature=0.5),
                np.random.default_rng(0), [0, 1])
    assert np.array_equal(logits, original)


def test_rejects_non_vector():
    with pytest.raises(ValueError, match="1-D"):
        top_k_filter(np.zeros((2, 3), np.float32), 1)


# ---- choosing a token ----

def test_greedy_is_argmax_first_index_on_ties():
    logits = np.array([0.0, 5.0, -1.0, 5.0, 5.0], np.float32)
    config = GenerationConfig()
    assert sample_next(logits, config) == 1 == int(torch.argmax(torch.from_numpy(logits)))
    # repetition penalty applies in greedy mode too
    assert sample_next(logits, GenerationConfig(repetition_penalty=2.0), history_ids=[1]) == 3
    assert sample_next(logits, GenerationConfig(repetition_penalty=2.0), history_ids=[1, 3, 4]) == 1
    # other warpers never change the argmax; greedy ignores them
    assert sample_next(logits, GenerationConfig(top_k=1, top_p=0.1, temperature=0.2)) == 1


def test_greedy_on_random_logits(logits):
    assert sample_next(logits, GenerationConfig()) == int(np.argmax(logits))


def _draws(logits, config, seed, n):
    rng = np.random.default_rng(seed)
    return [sample_next(logits, config, rng) for _ in range(n)]


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = random_logits(np.random.default_rng(5), 500, scale=0.5)
    config = GenerationConfig(do_sample=True)
    first = _draws(logits, config, 123, 50)
    assert first == _draws(logits, config, 123, 50)
    assert first != _draws(logits, config, 124, 50)
    # seed=None (rng=None) draws fresh entropy: two such streams practically never agree
    fresh = [[sample_next(logits, config) for _ in range(20)] for _ in range(2)]
    assert fresh[0] != fresh[1]


def test_sampling_follows_filtered_distribution():
    logits = np.array([2.0, 1.5, 1.0, 0.2, -0.5, 3.0, -4.0, 0.9], np.float32)
    config = GenerationConfig(do_sample=True, temperature=0.8, top_k=6, top_p=0.9, repetition_penalty=1.5)
    history = [5, 6]
    n = 4000
    rng = np.random.default_rng(2024)
    counts = np.bincount([sample_next(logits, config, rng, history) for _ in range(n)], minlength=logits.size)
    chain = logits_process.LogitsProcessorList([
        logits_process.RepetitionPenaltyLogitsProcessor(1.5), logits_process.TemperatureLogitsWarper(0.8),
        logits_process.TopKLogitsWarper(6), logits_process.TopPLogitsWarper(0.9)])
    probs = torch.softmax(torch.from_numpy(hf(chain, logits, history)).double(), -1).numpy()
    support = probs > 0
    assert np.all(counts[~support] == 0), "a filtered token was drawn"
    expected = probs[support] * n
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    # 99.9% quantile of chi-square: df=2 → 13.8, df=4 → 18.5; the support has 3-5 tokens here
    assert support.sum() >= 3 and chi2 < 18.5, (counts, expected)


def test_sampling_never_draws_filtered_tokens():
    logits = random_logits(np.random.default_rng(9), 1000)
    config = GenerationConfig(do_sample=True, top_k=3)
    allowed = set(np.argsort(logits)[-3:].tolist())
    assert set(_draws(logits, config, 0, 300)) <= allowed
    one_hot = np.full(10, -np.inf, np.float32)
    one_hot[7] = 0.0
    assert set(_draws(one_hot, GenerationConfig(do_sample=True), 1, 50)) == {7}


def test_sampling_rejects_invalid_logits():
    with pytest.raises(ValueError, match="no token has a finite logit"):
        sample_next(np.full(4, np.nan, np.float32), GenerationConfig(do_sample=True), np.random.default_rng(0))


def test_decode_loop_modules_do_not_import_torch():
    root = Path(__file__).resolve().parents[1] / "edgevl"
    for name in ("sampling.py", "generation.py"):
        tree = ast.parse((root / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"torch", "transformers"}, (name, imported)


def test_stable_argsort_matches_numpy_stable():
    from edgevl.sampling import _stable_argsort

    rng = np.random.default_rng(11)
    coarse = np.round(rng.standard_normal(5000) * 4) / 4  # many ties, as bf16/fp16 logits have
    special = [0.0, -0.0, np.inf, -np.inf, -1e-45, 1e-45, np.finfo(np.float32).max, -np.finfo(np.float32).max]
    values = np.concatenate([coarse, special, special]).astype(np.float32)
    rng.shuffle(values)
    expected = np.argsort(np.where(values == 0, np.float32(0), values), kind="stable")
    np.testing.assert_array_equal(_stable_argsort(values), expected)
