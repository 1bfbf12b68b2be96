import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampler import (
    NO_TOKEN,
    Sampler,
    SamplingRow,
    argmax_rows,
    make_generator,
    process_logits,
)
from engine.sampling_params import SamplingParams
from engine.sequence import Request, Sequence
from tests.conftest import TEST_DEVICE

VOCAB = 64
EOS = 7


def sample(logits, rows):
    """Sample on the test device (TOKENMILL_TEST_DEVICE, default cpu)."""
    return Sampler()(logits.to(TEST_DEVICE), rows)


def processed(logits, rows):
    return process_logits(logits.to(TEST_DEVICE), rows).cpu()


def row(params=None, prompt=(), output=(), seed=None, eos=(EOS,)):
    params = params or SamplingParams()
    gen = make_generator(seed if seed is not None else params.seed)
    return SamplingRow(params, list(prompt), list(output), gen, eos)


def rows_of(params, n):
    return [row(params) for _ in range(n)]


def counts(tokens, vocab):
    return torch.bincount(torch.tensor(tokens), minlength=vocab)


@pytest.fixture
def logits():
    return torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax(logits):
    tokens, lps = sample(logits, rows_of(SamplingParams(temperature=0), 8))
    assert tokens == logits.argmax(dim=-1).tolist()
    assert lps == [None] * 8


def test_greedy_ties_pick_lowest_id():
    x = torch.tensor([[0.0, 5.0, 1.0, 5.0, 5.0]])
    assert sample(x, [row(SamplingParams(temperature=0))])[0] == [1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(logits, dtype):
    x = logits.to(dtype)
    greedy, _ = sample(x, rows_of(SamplingParams(temperature=0), 8))
    assert greedy == x.float().argmax(dim=-1).tolist()
    sampled, _ = sample(x, rows_of(SamplingParams(top_k=1, repetition_penalty=1.2), 8))
    assert sampled == greedy  # no repeated tokens, so the penalty changes nothing


@pytest.mark.parametrize("num_sampled", [1, 3, 8], ids=["few-sampled", "most", "all"])
def test_mixed_batch_routes_each_row(logits, num_sampled):
    """Greedy rows ignore filters; sampled rows with top_k=1 must agree with them."""
    torch.manual_seed(6)
    greedy = SamplingParams(temperature=0, top_k=3, top_p=0.5, min_p=0.5)
    one = SamplingParams(temperature=1.3, top_k=1)
    rows = [row(one if i < num_sampled else greedy) for i in range(8)]
    assert sample(logits, rows)[0] == logits.argmax(dim=-1).tolist()
    out = processed(logits, rows)
    assert torch.equal(out[num_sampled:], logits[num_sampled:])  # greedy rows: untouched
    assert (torch.isfinite(out[:num_sampled]).sum(dim=-1) == 1).all()


def test_shape_mismatch_is_rejected(logits):
    with pytest.raises(ValueError, match="rows"):
        sample(logits, rows_of(SamplingParams(), 3))


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)],
    ids=["top_k=1", "top_p=tiny", "min_p=1"],
)
def test_filters_that_keep_one_token_equal_greedy(logits, params):
    torch.manual_seed(1)
    for _ in range(5):
        assert sample(logits, rows_of(params, 8))[0] == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_the_k_best(logits):
    torch.manual_seed(2)
    x = logits[:1].expand(2000, -1)
    tokens, _ = sample(x, rows_of(SamplingParams(temperature=5.0, top_k=3), 2000))
    best3 = set(logits[0].topk(3).indices.tolist())
    assert set(tokens) == best3  # all of them, and only them (high temperature flattens)


def test_top_k_larger_than_vocab_is_off(logits):
    a = processed(logits, rows_of(SamplingParams(top_k=VOCAB + 10), 8))
    assert torch.equal(a, logits)


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (SamplingParams(top_p=0.45), [0]),
        (SamplingParams(top_p=0.7), [0, 1]),
        (SamplingParams(top_p=0.85), [0, 1, 2]),
        (SamplingParams(top_p=0.99), [0, 1, 2, 3]),
        (SamplingParams(top_p=0.99, top_k=2), [0, 1]),
        (SamplingParams(min_p=0.5), [0, 1]),  # keeps p >= 0.25
        (SamplingParams(min_p=0.2), [0, 1, 2]),  # keeps p >= 0.1
        (SamplingParams(top_p=0.85, min_p=0.5), [0, 1]),
    ],
)
def test_top_p_and_min_p_keep_the_right_set(params, kept):
    perm = torch.tensor([2, 0, 3, 1])  # not sorted, to exercise the scatter back
    x = PROBS[perm].log().unsqueeze(0)
    out = processed(x, [row(params)])[0]
    kept_ids = sorted(perm.argsort()[kept].tolist())
    assert torch.isfinite(out).nonzero().flatten().tolist() == kept_ids
    assert torch.allclose(out[kept_ids], x[0, kept_ids])


def test_top_p_matches_a_full_sort_reference():
    """Rows whose nucleus ends inside the first, second and last candidate tier, in one batch."""
    vocab = 3000
    x = torch.randn(8, vocab, generator=torch.Generator().manual_seed(5))
    rows, expected = [], []
    for i, (end, top_k) in enumerate(
        [(0, -1), (30, -1), (500, -1), (2500, -1), (0, 2800), (40, 100), (2000, 2800), (7, 8)]
    ):
        probs = torch.softmax(x[i].double(), dim=-1).sort(descending=True).values
        k = vocab if top_k == -1 else top_k
        mass = probs[:k].cumsum(dim=0) / probs[:k].sum()
        # A top_p halfway between two running masses makes `end` the nucleus' last token.
        top_p = float(mass[end] + mass[end - 1]) / 2 if end else float(mass[0]) / 2
        rows.append(row(SamplingParams(top_p=top_p, top_k=top_k)))
        expected.append(sorted(x[i].topk(end + 1).indices.tolist()))
    # Alone, each row goes through the candidate tiers; batched, the widest top-k sets the width.
    alone = torch.cat([processed(x[i : i + 1], [r]) for i, r in enumerate(rows)])
    for out in (alone, processed(x, rows)):
        for i in range(8):
            assert torch.isfinite(out[i]).nonzero().flatten().tolist() == expected[i]


def test_min_p_is_applied_after_temperature():
    x = PROBS.log().unsqueeze(0)
    # At T=0.5 the probabilities become ∝ p^2 = [.25, .09, .0225, .0025]; min_p=0.3 keeps
    # only p^2 >= 0.075, i.e. tokens 0 and 1 (token 2 would pass at T=1: 0.15 >= 0.15).
    out = processed(x, [row(SamplingParams(temperature=0.5, min_p=0.3))])[0]
    assert torch.isfinite(out).tolist() == [True, True, False, False]


def test_repetition_penalty_matches_hand_computation():
    x = torch.tensor([[2.0, -2.0, 3.0, -1.0, 4.0, 0.5]])
    r = row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0, 1, 1], output=[3])
    out = processed(x, [r])[0]
    assert out.tolist() == [1.0, -4.0, 3.0, -2.0, 4.0, 0.5]


def test_presence_and_frequency_penalties_match_hand_computation():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    r = row(params, prompt=[4, 4, 4], output=[1, 2, 2, 2, 1, 2])
    out = processed(x, [r])[0]
    # token 1: twice, token 2: four times; the prompt-only token 4 is not penalised.
    expected = [1.0, 1 - 0.5 - 0.25 * 2, 1 - 0.5 - 0.25 * 4, 1.0, 1.0]
    assert out.tolist() == pytest.approx(expected)


def test_penalties_change_greedy_choice_per_row():
    x = torch.tensor([[3.0, 2.9, 0.0]]).expand(3, -1)
    rows = [
        row(SamplingParams(temperature=0), output=[0]),
        row(SamplingParams(temperature=0, frequency_penalty=0.2), output=[0]),
        row(SamplingParams(temperature=0, repetition_penalty=1.1), prompt=[0]),
    ]
    assert sample(x, rows)[0] == [0, 1, 1]


@settings(max_examples=30, deadline=None)
@given(
    allowed=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_allowed_token_ids_confine_every_row_that_has_them(allowed, seed):
    """vLLM's allowed_token_ids: greedy or sampled, the token is one of them (the best of
    them, greedily); a row without them in the same batch is untouched."""
    x = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    rows = [
        row(SamplingParams(temperature=0, allowed_token_ids=allowed)),
        row(SamplingParams(temperature=1.0, allowed_token_ids=allowed), seed=seed),
        row(SamplingParams(temperature=0)),
    ]
    greedy, drawn, free = sample(x, rows)[0]
    best = max(set(allowed), key=lambda t: (x[0, t].item(), -t))
    assert greedy == best and drawn in allowed and free == int(x[2].argmax())
    assert sample(x[:1], rows[:1])[0] == [best]  # a batch of greedy rows alone too
    out = processed(x[:1], rows[:1])[0]
    assert all(out[t] == x[0, t] for t in allowed)
    assert all(out[t] == -math.inf for t in range(VOCAB) if t not in allowed)


def test_banned_tokens_are_never_sampled(logits):
    """A row's banned tokens (vLLM's bad_words, from Sequence.banned_tokens) get -inf,
    greedy or sampled; the other rows keep theirs."""
    best = logits.argmax(dim=-1).tolist()
    greedy = replace(row(SamplingParams(temperature=0)), banned=[best[0]])
    # only the last token is left
    drawn = replace(row(SamplingParams(temperature=1.0), seed=1), banned=list(range(VOCAB - 1)))
    tokens, _ = sample(logits[:3], [greedy, drawn, row(SamplingParams(temperature=0))])
    second = max((t for t in range(VOCAB) if t != best[0]), key=lambda t: logits[0, t].item())
    assert tokens == [second, VOCAB - 1, best[2]]


def test_a_row_with_every_token_excluded_gets_no_token(logits):
    """allowed_token_ids all banned: NO_TOKEN (the engine fails that request alone), greedy
    or sampled; a batch-mate still gets its own token."""
    params = [SamplingParams(temperature=t, allowed_token_ids=[3, 4], logprobs=2) for t in (0, 1.0)]
    rows = [replace(row(p, seed=1), banned=[3, 4]) for p in params] + [row()]
    tokens, logprobs = Sampler()(logits[:3], rows)
    assert tokens[:2] == [NO_TOKEN, NO_TOKEN] and 0 <= tokens[2] < VOCAB
    assert logprobs[:2] == [None, None]


def test_a_bad_words_last_token_is_banned_once_the_output_ends_with_the_rest():
    request = Request("r", None, [7, 8], SamplingParams())
    request.bad_words_token_ids = [[5, 6, 9], [4]]
    seq = Sequence(request, 0, [7, 8], 2)
    assert seq.banned_tokens() == [4]  # a one-token word, always
    for token, banned in ((5, [4]), (6, [9, 4]), (9, [4]), (5, [4])):
        seq.token_ids.append(token)
        assert seq.banned_tokens() == banned
    # the prompt does not count: only the output may start a word
    request.bad_words_token_ids = [[8, 1]]
    assert Sequence(request, 0, [7, 8], 2).banned_tokens() == []


def test_min_tokens_suppresses_eos_and_stop_ids_then_allows_them():
    x = torch.zeros(1, 12)
    x[0, EOS] = 10.0
    x[0, 9] = 9.0
    x[0, 3] = 8.0
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[9])
    assert sample(x, [row(params, output=[1])])[0] == [3]
    assert sample(x, [row(params, output=[1, 1])])[0] == [EOS]
    ignore = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[9], ignore_eos=True)
    assert sample(x, [row(ignore, output=[])])[0] == [EOS]  # EOS is an ordinary token now
    out = processed(x, [row(params, output=[])])[0]
    assert out[EOS] == out[9] == -math.inf and out[3] == 8.0


def test_logprobs_are_of_the_raw_distribution(logits):
    params = [
        SamplingParams(temperature=0.3, logprobs=5, repetition_penalty=1.5),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(top_k=4, top_p=0.5, logprobs=20),
        SamplingParams(),
    ]
    rows = [row(p, prompt=range(10)) for p in params]
    tokens, lps = sample(logits[:4], rows)
    raw = torch.log_softmax(logits[:4], dim=-1)
    assert lps[3] is None
    for i, k in enumerate([5, 0, 20]):
        lp = lps[i]
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(raw[i, tokens[i]].item(), abs=1e-5)
        assert len(lp.top) == k
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        expected = raw[i].topk(k) if k else None
        if k:
            assert [t for t, _ in lp.top] == expected.indices.tolist()
            assert values == pytest.approx(expected.values.tolist(), abs=1e-5)


def test_logprobs_read_as_vllms_dict_of_ranked_entries(logits):
    """vLLM's shape: {token_id: Logprob(logprob, rank)}, the sampled token first with its
    rank in the distribution, then the top tokens by rank."""
    params = SamplingParams(temperature=1.0, seed=3, logprobs=3)
    tokens, lps = sample(logits[:1], [row(params)])
    lp, raw = lps[0], torch.log_softmax(logits[0], dim=-1)
    assert next(iter(lp)) == tokens[0]
    assert lp[tokens[0]].rank == int((raw > raw[tokens[0]]).sum()) + 1
    top = raw.topk(3).indices.tolist()
    assert [lp[t].rank for t in top] == [1, 2, 3] and set(lp) == {tokens[0], *top}
    assert lp[top[0]].logprob == pytest.approx(raw.max().item(), abs=1e-5)
    assert dict(lp) == {t: lp[t] for t in lp} and len(lp) == len({tokens[0], *top})


def test_logprobs_of_a_vocabulary_smaller_than_k():
    x = torch.tensor([[0.0, 2.0, 1.0]])
    _, lps = sample(x, [row(SamplingParams(temperature=0, logprobs=20))])
    assert [t for t, _ in lps[0].top] == [1, 2, 0]


def chi_square(observed, probs):
    expected = probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


# 0.999 quantile of chi-square with 5 degrees of freedom: a correct sampler fails 0.1% of seeds.
CHI2_5_999 = 20.52
CHI2_4_999 = 18.47


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_frequencies_follow_the_distribution(seeded):
    torch.manual_seed(3)
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    n = 4000
    x = probs.log().unsqueeze(0).expand(n, -1)
    if seeded:  # one generator stepped over many calls
        r = row(SamplingParams(seed=11))
        tokens = [sample(x[:1], [r])[0][0] for _ in range(n // 4)]
        n = len(tokens)
    else:
        tokens, _ = sample(x, rows_of(SamplingParams(), n))
    assert chi_square(counts(tokens, 6).float(), probs) < CHI2_5_999


def test_frequencies_across_vocabulary_blocks():
    """A vocabulary of several draw blocks plus a ragged tail, with mass spread over all."""
    torch.manual_seed(5)
    vocab, n = 1000, 4000
    probs = torch.full((vocab,), 0.1 / (vocab - 4))
    probs[[3, 300, 700, 999]] = torch.tensor([0.4, 0.2, 0.2, 0.1])
    x = probs.log().unsqueeze(0).expand(n, -1)
    tokens, _ = sample(x, rows_of(SamplingParams(), n))
    c = counts(tokens, vocab).float()
    rest = torch.ones(vocab, dtype=torch.bool)
    rest[[3, 300, 700, 999]] = False
    observed = torch.cat([c[[3, 300, 700, 999]], c[rest].sum().unsqueeze(0)])
    assert chi_square(observed, torch.tensor([0.4, 0.2, 0.2, 0.1, 0.1])) < CHI2_4_999
    assert c[rest].count_nonzero() > 250  # the tail tokens are really drawn, not just lumped


def test_temperature_scales_the_distribution():
    torch.manual_seed(4)
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    n = 4000
    x = probs.log().unsqueeze(0).expand(n, -1)
    tokens, _ = sample(x, rows_of(SamplingParams(temperature=2.0), n))
    target = torch.softmax(probs.log() / 2.0, dim=-1)
    assert chi_square(counts(tokens, 6).float(), target) < CHI2_5_999
    assert chi_square(counts(tokens, 6).float(), probs) > CHI2_5_999  # not the T=1 law


def test_same_seed_same_tokens_different_seed_differs():
    x = torch.zeros(1, 1000)
    a, b, c = row(SamplingParams(seed=5)), row(SamplingParams(seed=5)), row(SamplingParams(seed=6))
    run = [[sample(x, [r])[0][0] for _ in range(20)] for r in (a, b, c)]
    assert run[0] == run[1] != run[2]


random_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    top_k=st.sampled_from([-1, 1, 5, 40]),
    min_p=st.sampled_from([0.0, 0.05]),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
    presence_penalty=st.sampled_from([0.0, 0.5]),
    frequency_penalty=st.sampled_from([0.0, -0.4]),
    min_tokens=st.sampled_from([0, 2]),
    logprobs=st.sampled_from([None, 0, 3]),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
)


@settings(max_examples=40, deadline=None)
@given(
    seeded=random_params,
    seed=st.integers(0, 2**31),
    others=st.lists(random_params, max_size=6),
    position=st.integers(0, 6),
    data_seed=st.integers(0, 2**16),
)
def test_seeded_row_ignores_its_batch(seeded, seed, others, position, data_seed):
    data = torch.Generator().manual_seed(data_seed)
    steps = 4
    vocab = 300  # one full draw block and a ragged tail
    logits = torch.randn(steps, len(others) + 1, vocab, generator=data) * 2
    prompt = torch.randint(0, vocab, (5,), generator=data).tolist()
    position = min(position, len(others))

    def run(batched):
        mine = row(seeded, prompt=prompt, seed=seed)
        batch = [row(p, prompt=prompt) for p in others] if batched else []
        where = position if batched else 0
        batch.insert(where, mine)
        got = []
        for step in range(steps):
            x = logits[step] if batched else logits[step, position : position + 1]
            tokens, lps = sample(x, batch)
            got.append((tokens[where], lps[where]))
            for r, t in zip(batch, tokens, strict=True):
                r.output_token_ids.append(t)
        return got

    assert run(batched=False) == run(batched=True)


def test_token_slice_is_a_live_window_without_a_copy():
    from engine.sequence import TokenSlice

    tokens = [5, 6, 7]
    prompt, output = TokenSlice(tokens, 0, 2), TokenSlice(tokens, 2)
    assert list(prompt) == [5, 6] and list(output) == [7] and len(output) == 1
    tokens.append(8)  # the sequence grows: the output window sees it
    assert list(output) == [7, 8] and len(output) == 2 and output[-1] == 8
    assert [*prompt, *output] == tokens


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(1, 1500),
    seed=st.integers(0, 2**31 - 1),
    special=st.sampled_from([None, float("-inf"), float("nan"), float("inf")]),
)
def test_argmax_rows_is_torch_argmax(rows, vocab, seed, special):
    """Ties (values from a few levels), all -inf rows, infinities and NaNs included: the first
    index of each row's maximum, NaN counting as the maximum, exactly as torch.argmax."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4, (rows, vocab), generator=gen).float()
    if special is not None:
        x[torch.rand(rows, vocab, generator=gen) < 0.3] = special
    if rows > 1:
        x[-1] = float("-inf")
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
