"""Selection is exact: every group type is compared with a brute-force stable-sort reference."""

import math

import pytest
import torch

from safety_peft.errors import SelectionError
from safety_peft.masks import SafetyMasks
from safety_peft.selection import num_selected, select_critical, top_mask


def reference_top(values: list[float], k: int) -> list[bool]:
    """The k largest values; Python's sort is stable, so equal values keep index order (lower wins)."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    chosen = set(order[:k])
    return [i in chosen for i in range(len(values))]


def reference_top_mask(scores: dict, fraction: float, group: str) -> dict:
    scores = {name: t.to(torch.float32) for name, t in scores.items()}
    out = {}
    if group == "row":
        for name, t in scores.items():
            rows = [reference_top(row.tolist(), num_selected(fraction, t.shape[1])) for row in t]
            out[name] = torch.tensor(rows, dtype=torch.bool).view(t.shape)
    elif group == "layer":
        for name, t in scores.items():
            flat = t.reshape(-1).tolist()
            out[name] = torch.tensor(reference_top(flat, num_selected(fraction, len(flat))), dtype=torch.bool)
            out[name] = out[name].view(t.shape)
    else:
        flat = [v for t in scores.values() for v in t.reshape(-1).tolist()]
        chosen = torch.tensor(reference_top(flat, num_selected(fraction, len(flat))), dtype=torch.bool)
        start = 0
        for name, t in scores.items():
            out[name] = chosen[start : start + t.numel()].view(t.shape)
            start += t.numel()
    return out


def make_scores(kind: str, seed: int = 0) -> dict:
    """Deliberately not in alphabetical order, so global ties must follow the mapping's order."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"z.weight": (3, 5), "a.weight": (4, 4), "m.weight": (2, 7)}
    out = {}
    for name, shape in shapes.items():
        if kind == "continuous":
            out[name] = torch.rand(shape, generator=g)
        elif kind == "ties":  # lots of equal scores
            out[name] = torch.randint(0, 3, shape, generator=g).float()
        elif kind == "signed":  # negatives, both zeros, infinities: exercises the sign-aware keys
            pool = torch.tensor([-2.5, -1.0, -0.0, 0.0, 0.5, 1.0, float("inf"), float("-inf"), 3e-42, -3e-42])
            out[name] = pool[torch.randint(0, len(pool), shape, generator=g)]
        else:
            raise AssertionError(kind)
    return out


FRACTIONS = [0.0, 0.01, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.99, 1.0]


@pytest.mark.parametrize("group", ["row", "layer", "global"])
@pytest.mark.parametrize("kind", ["continuous", "ties", "signed"])
def test_top_mask_matches_stable_sort_reference(group, kind):
    for seed in range(3):
        scores = make_scores(kind, seed)
        for fraction in FRACTIONS:
            got = top_mask(scores, fraction, group)
            want = reference_top_mask(scores, fraction, group)
            assert list(got) == list(scores)
            for name in scores:
                assert got[name].dtype == torch.bool and got[name].shape == scores[name].shape
                assert torch.equal(got[name], want[name]), (group, kind, seed, fraction, name)


def test_global_ties_follow_mapping_order_then_row_major():
    scores = {"second": torch.ones(2, 3), "first": torch.ones(2, 3)}
    got = top_mask(scores, 0.5, "global")  # 6 of 12: all of the first tensor in the mapping
    assert got["second"].all() and not got["first"].any()
    got = top_mask(scores, 0.25, "global")  # 3 of 12: first row of "second"
    assert got["second"].tolist() == [[True, True, True], [False, False, False]]
    assert not got["first"].any()


def test_layer_ties_take_lower_flat_index_and_row_ties_lower_column():
    scores = {"w": torch.tensor([[1.0, 2.0, 2.0], [2.0, 2.0, 0.0]])}
    assert top_mask(scores, 0.5, "layer")["w"].tolist() == [[False, True, True], [True, False, False]]
    assert top_mask(scores, 0.5, "row")["w"].tolist() == [[False, True, True], [True, True, False]]


def test_radix_threshold_inside_a_crowded_bucket_is_exact():
    # 50k values that share their high 16 bits and many exact ties: the second pass and the tie
    # resolution across tensors decide everything. Reference: torch's stable descending sort.
    g = torch.Generator().manual_seed(1)
    base = torch.tensor(1.0).view(torch.int32).item()
    bits = base + torch.randint(0, 300, (50_000,), generator=g, dtype=torch.int32)
    values = bits.view(torch.float32)
    scores = {"a": values[:20_000].view(100, 200), "b": values[20_000:].view(300, 100)}
    for fraction in [0.001, 0.3, 0.77]:
        k = num_selected(fraction, values.numel())
        order = torch.sort(values, descending=True, stable=True).indices[:k]
        want = torch.zeros(values.numel(), dtype=torch.bool)
        want[order] = True
        got = top_mask(scores, fraction, "global")
        assert torch.equal(torch.cat([got["a"].reshape(-1), got["b"].reshape(-1)]), want)
        assert int(got["a"].sum() + got["b"].sum()) == k


def test_counts_are_ceil_of_decimal_fraction():
    assert num_selected(0.07, 100) == 7  # float arithmetic would give ceil(7.000000000000001) == 8
    assert num_selected(0.01, 150) == 2
    assert num_selected(1e-9, 10) == 1
    assert num_selected(0.5, 3) == 2
    assert num_selected(0.0, 10) == 0 and num_selected(1.0, 10) == 10
    scores = {"w": torch.rand(10, 10)}
    assert int(top_mask(scores, 0.07, "layer")["w"].sum()) == 7
    assert int(top_mask(scores, 0.07, "global")["w"].sum()) == 7
    assert top_mask(scores, 0.07, "row")["w"].sum(dim=1).tolist() == [1] * 10  # ceil(0.7) per row


def test_other_float_dtypes_are_compared_as_float32():
    scores = make_scores("continuous")
    want = top_mask(scores, 0.3, "global")
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        converted = {n: t.to(dtype) for n, t in scores.items()}
        got = top_mask(converted, 0.3, "global")
        ref = reference_top_mask({n: t.float() for n, t in converted.items()}, 0.3, "global")
        assert all(torch.equal(got[n], ref[n]) for n in scores)
    assert all(torch.equal(top_mask(scores, 0.3, "global")[n], want[n]) for n in scores)  # deterministic


def test_inputs_are_not_modified():
    scores = make_scores("signed")
    before = {n: t.clone() for n, t in scores.items()}
    for group in ("row", "layer", "global"):
        top_mask(scores, 0.4, group)
    assert all(torch.equal(scores[n], before[n]) for n in scores)


@pytest.mark.parametrize("group", ["row", "layer", "global"])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("nan", [float("nan"), -float("nan")])
def test_nan_scores_are_refused(group, fraction, nan):
    scores = make_scores("signed")
    scores["a.weight"][1, 2] = nan
    with pytest.raises(SelectionError, match="'a.weight' contain NaN"):
        top_mask(scores, fraction, group)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), True, "0.1", None])
def test_bad_fraction(bad):
    with pytest.raises(SelectionError, match=r"fraction"):
        top_mask({"w": torch.rand(2, 2)}, bad, "layer")
    with pytest.raises(SelectionError, match=r"sparsity"):
        select_critical({"w": torch.rand(2, 2)}, bad)
    with pytest.raises(SelectionError, match=r"utility_sparsity"):
        select_critical(
            {"w": torch.rand(2, 2)}, 0.1, utility_scores={"w": torch.rand(2, 2)}, utility_sparsity=bad
        )


def test_fraction_error_says_the_range():
    with pytest.raises(SelectionError, match=r"\[0, 1\].*got 3"):
        top_mask({"w": torch.rand(2, 2)}, 3, "layer")


def test_bad_group_and_shapes():
    with pytest.raises(SelectionError, match="unknown selection group 'neuron'.*'row', 'layer', 'global'"):
        top_mask({"w": torch.rand(2, 2)}, 0.1, "neuron")
    with pytest.raises(SelectionError, match="group 'row' needs 2-D weights.*'b'.*\\(4,\\)"):
        top_mask({"b": torch.rand(4)}, 0.1, "row")
    with pytest.raises(SelectionError, match="torch.Tensor"):
        top_mask({"w": [1.0, 2.0]}, 0.1, "layer")
    with pytest.raises(SelectionError, match="real numbers"):
        top_mask({"w": torch.ones(2, 2, dtype=torch.bool)}, 0.1, "layer")
    assert top_mask({}, 0.5, "global") == {}
    empty = top_mask({"e": torch.zeros(0, 3), "w": torch.rand(2, 3)}, 0.5, "global")
    assert empty["e"].shape == (0, 3) and int(empty["w"].sum()) == 3


class Scores(dict):
    """Stands in for scoring.SafetyScores: a mapping with provenance."""

    def __init__(self, data, provenance):
        super().__init__(data)
        self.provenance = provenance


@pytest.mark.parametrize("group", ["row", "layer", "global"])
def test_set_difference_is_exact(group):
    safety = make_scores("ties", seed=4)
    utility = make_scores("continuous", seed=5)
    masks = select_critical(safety, 0.4, utility_scores=utility, utility_sparsity=0.3, group=group)
    top_s = reference_top_mask(safety, 0.4, group)
    top_u = reference_top_mask(utility, 0.3, group)
    assert isinstance(masks, SafetyMasks) and masks.granularity == "weight"
    assert masks.names == list(safety)
    for name in safety:
        assert torch.equal(masks[name], top_s[name] & ~top_u[name])
    assert masks.num_locked < sum(int(m.sum()) for m in top_s.values())  # the difference removed some


def test_utility_in_a_different_order_breaks_ties_in_safety_order():
    safety = {"b": torch.rand(2, 2), "a": torch.rand(2, 2)}
    utility = {"a": torch.ones(2, 2), "b": torch.ones(2, 2)}  # all tied: "b" (safety's first) wins
    masks = select_critical(safety, 1.0, utility_scores=utility, utility_sparsity=0.5, group="global")
    assert not masks["b"].any() and masks["a"].all()


def test_no_utility_and_zero_q_mean_plain_top():
    safety = make_scores("continuous")
    plain = select_critical(safety, 0.2, group="global")
    with_zero_q = select_critical(
        safety, 0.2, utility_scores=make_scores("ties"), utility_sparsity=0.0, group="global"
    )
    want = reference_top_mask(safety, 0.2, "global")
    for name in safety:
        assert torch.equal(plain[name], want[name]) and torch.equal(with_zero_q[name], want[name])


@pytest.mark.parametrize("group", ["layer", "global"])
def test_neuron_granularity_ranks_rows_by_summed_score(group):
    safety = make_scores("continuous", seed=7)
    utility = make_scores("continuous", seed=8)
    masks = select_critical(
        safety, 0.4, utility_scores=utility, utility_sparsity=0.25, group=group, granularity="neuron"
    )
    rows_s = reference_top_mask({n: t.sum(dim=1) for n, t in safety.items()}, 0.4, group)
    rows_u = reference_top_mask({n: t.sum(dim=1) for n, t in utility.items()}, 0.25, group)
    assert masks.granularity == "neuron"
    for name, t in safety.items():
        rows = rows_s[name] & ~rows_u[name]
        assert torch.equal(masks.row_mask(name), rows)
        assert masks.shape(name) == t.shape
        assert torch.equal(masks[name], rows[:, None].expand(t.shape))
    assert masks.num_locked == sum(int(masks.row_mask(n).sum()) * safety[n].shape[1] for n in safety)


def test_neuron_granularity_refuses_row_group_and_1d_scores():
    with pytest.raises(SelectionError, match="'row' cannot be combined with neuron granularity"):
        select_critical(make_scores("continuous"), 0.1, group="row", granularity="neuron")
    with pytest.raises(SelectionError, match="neuron granularity needs 2-D weights.*'bias'"):
        select_critical({"bias": torch.rand(5)}, 0.1, granularity="neuron")
    with pytest.raises(SelectionError, match="unknown granularity 'column'"):
        select_critical(make_scores("continuous"), 0.1, granularity="column")


def test_utility_scores_must_match_names_and_shapes():
    safety = make_scores("continuous")
    utility = make_scores("continuous", seed=1)
    del utility["a.weight"]
    utility["extra.weight"] = torch.rand(2, 2)
    with pytest.raises(
        SelectionError,
        match="missing from the utility scores: 'a.weight'.*only in the utility scores: 'extra.weight'",
    ):
        select_critical(safety, 0.1, utility_scores=utility, utility_sparsity=0.1)
    utility = make_scores("continuous", seed=1)
    utility["m.weight"] = torch.rand(7, 2)
    with pytest.raises(
        SelectionError, match=r"shape of 'm.weight' is \(2, 7\) in the safety scores but \(7, 2\)"
    ):
        select_critical(safety, 0.1, utility_scores=utility, utility_sparsity=0.1)


def test_other_bad_select_critical_inputs():
    with pytest.raises(SelectionError, match="utility_sparsity is set but no utility_scores"):
        select_critical(make_scores("continuous"), 0.1, utility_sparsity=0.1)
    with pytest.raises(SelectionError, match="empty"):
        select_critical({}, 0.1)


def test_provenance_is_scores_provenance_plus_settings():
    scores_prov = {"method": "wanda", "data": {"source": "safety.jsonl", "fingerprint": "abc"}, "nsamples": 8}
    safety = Scores(make_scores("continuous"), scores_prov)
    utility = Scores(make_scores("continuous", 1), {"method": "wanda", "data": "utility-fp"})
    masks = select_critical(
        safety, 0.05, utility_scores=utility, utility_sparsity=0.02, group="global", granularity="neuron"
    )
    assert masks.provenance == {
        **scores_prov,
        "sparsity": 0.05,
        "utility_sparsity": 0.02,
        "group": "global",
        "granularity": "neuron",
        "utility_data": "utility-fp",
    }
    masks.provenance["data"]["source"] = "changed"
    assert scores_prov["data"]["source"] == "safety.jsonl"  # a copy, not shared
    plain = select_critical(make_scores("continuous"), 0.05)
    assert plain.provenance == {
        "sparsity": 0.05,
        "utility_sparsity": 0.0,
        "group": "layer",
        "granularity": "weight",
    }


def test_select_critical_counts_per_group():
    scores = {"w1": torch.rand(8, 10), "w2": torch.rand(4, 5)}
    assert select_critical(scores, 0.1, group="layer").num_locked == 8 + 2
    assert select_critical(scores, 0.1, group="row").num_locked == 8 * 1 + 4 * 1
    assert select_critical(scores, 0.1, group="global").num_locked == math.ceil(0.1 * 100)
    assert select_critical(scores, 0.1, group="global", granularity="neuron").num_locked in (2 * 10, 10 + 5)
