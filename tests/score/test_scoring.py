"""The scorer (latentct/score/scoring.py) on constructed effect matrices whose answer is known."""
import numpy as np
import pytest
import torch

from latentct.data.phantom import FACTORS
from latentct.score.scoring import (
    AREA_TAUS,
    TAUS,
    across_seeds,
    area,
    attribution,
    direction_mark,
    effect_dci,
    line_effects,
    null_sets,
    p_value,
    score_directions,
    shares,
    significance,
    verdict,
)

Z, Y, ROT, THICK, WIDTH, BREAST = range(6)
NO_FLOOR = np.zeros(6)


def table(rows, r2=0.9, floor=NO_FLOOR):
    effect = np.array(rows, dtype=float)
    return score_directions(np.full_like(effect, r2), effect, floor)


def row(**effects):
    out = np.zeros(6)
    for name, value in effects.items():
        out[FACTORS.index(name)] = value
    return out


def test_line_effects_and_attribution_on_a_constructed_response():
    eps = torch.linspace(-1, 1, 5)
    values = torch.zeros(2, 5, 3, 6)
    values[0, :, :, 1] = 3 * eps[:, None]        # direction 0 moves factor 1 by 6 over the span ...
    values[0, :, :, 4] = -1 * eps[:, None]       # ... and factor 4 by 2: raw leakage 2 / 8
    values[1, :, :, 0] = 0.5 * eps[:, None]      # direction 1 moves factor 0 alone
    r2, effect = line_effects(values, eps)
    assert np.allclose(effect[0], [0, 6, 0, 0, 2, 0]) and np.allclose(effect[1], [1, 0, 0, 0, 0, 0])
    assert np.allclose(r2[0, [1, 4]], 1) and np.allclose(r2[1, 0], 1)
    own, leakage = attribution(effect)
    assert own.tolist() == [1, 0] and np.allclose(leakage, [0.25, 0.0])
    result = score_directions(r2, effect, NO_FLOOR)
    assert result["recovered_at"] == {"0.5": 2, "0.67": 2, "0.8": 1}  # direction 0's y share is 0.75


def test_a_match_that_is_not_the_directions_main_effect_is_rejected():
    """Width 0.51, y_offset 0.49: y_offset is not what the direction mainly does, at any tau."""
    result = table([row(width=0.51, y_offset=0.49)])
    assert [m["factor"] for m in result["matches"]["0.5"]] == ["width"]
    assert result["recovered_at"] == {"0.5": 1, "0.67": 0, "0.8": 0}


def test_a_tie_at_one_half_passes_for_neither_factor():
    assert table([row(width=1.0, thickness=1.0)])["recovered_at"]["0.5"] == 0
    # equal excesses above unequal floors: in floating point the shares come out 0.49999999999999994 and
    # 0.5000000000000001, and the second used to pass
    floor = row(width=0.4, thickness=0.2)
    tie = table([row(width=0.7, thickness=0.5)], floor=floor)
    assert tie["recovered_at"]["0.5"] == 0 and tie["curve"][0] == 0
    assert table([row(width=0.7, thickness=0.51)], floor=floor)["recovered_at"]["0.5"] == 1  # just above: passes


def test_the_line_r2_needs_at_least_one_half():
    assert table([row(rotation=1.0)], r2=0.5)["recovered_at"]["0.8"] == 1
    assert table([row(rotation=1.0)], r2=0.4999)["recovered_at"]["0.5"] == 0


def test_a_tiny_effect_is_rejected_however_clean():
    floor = np.full(6, 0.01)
    tiny = table([row(rotation=0.015)], floor=floor)   # share 1 above the floor, but under twice the floor
    assert tiny["recovered_at"]["0.5"] == 0
    assert table([row(rotation=0.02)], floor=floor)["recovered_at"]["0.5"] == 1  # exactly twice the floor passes


def test_the_noise_floor_is_taken_off_before_the_shares():
    floor = row(z_position=0.3, width=0.3)
    effect = np.array([row(z_position=1.3, width=0.3, thickness=0.2)])  # above the floors: z 1.0, thickness 0.2
    assert shares(effect, floor)[0, Z] == pytest.approx(1.0 / 1.2)
    assert table(effect, floor=floor)["recovered_at"]["0.8"] == 1


def test_a_line_r2_under_one_half_does_not_pass():
    assert table([row(y_offset=2.0)], r2=0.49)["recovered_at"]["0.5"] == 0


def test_the_largest_share_stands_for_the_factor_and_the_other_is_listed_also():
    result = table([row(z_position=1.0, width=0.2),        # k=0: z share 0.83
                    row(z_position=0.5),                    # k=1: z share 1.0, smaller effect
                    row(width=1.0)])
    z_match = next(m for m in result["matches"]["0.67"] if m["factor"] == "z_position")
    assert z_match["direction"] == 1 and z_match["also"] == [0] and result["recovered_at"]["0.67"] == 2
    marks = [direction_mark(r) for r in result["directions"]]
    assert marks[1] == "clean z_position, 1.00"
    assert marks[0] == "clean z_position, 0.83 (also: k=1 stands for it)"  # never "not clean"
    assert marks[2] == "clean width, 1.00"
    tie = table([row(rotation=1.0), row(rotation=2.0)])      # equal shares: the larger effect stands
    assert tie["matches"]["0.5"][0]["direction"] == 1


def test_a_mixed_direction_is_marked_by_its_largest_share():
    result = table([row(z_position=0.55, y_offset=0.45)])
    assert direction_mark(result["directions"][0]) == "mostly z_position, share 0.55 (share under 0.67)"
    floor = np.full(6, 0.2)
    faint = table([row(y_offset=0.3), row(width=1.0)], floor=floor)  # a share of 1.00, but under twice the floor
    assert direction_mark(faint["directions"][0]) == "mostly y_offset, share 1.00 (under twice the noise floor)"
    wavy = table([row(width=1.0)], r2=0.3)
    assert direction_mark(wavy["directions"][0]) == "mostly width, share 1.00 (line R2 0.30)"


def test_area_is_relative_to_the_supervised_curve():
    sup = np.full(len(AREA_TAUS), 4.0)
    assert area(np.full(len(AREA_TAUS), 2.0), sup) == pytest.approx(0.5)
    assert area(np.ones(len(AREA_TAUS)), np.zeros(len(AREA_TAUS))) is None and area(sup, None) is None


def test_p_value_on_a_constructed_null():
    null = np.array([0, 0, 1, 1, 2, 3, 3, 3, 4, 5])
    assert p_value(3, null) == pytest.approx((1 + 5) / 11)   # five null draws reach 3
    assert p_value(6, null) == pytest.approx(1 / 11) and p_value(0, null) == pytest.approx(1.0)
    assert verdict(0.001) == "above null" and verdict(0.03) == "above null, borderline"
    assert verdict(0.15) == "not above null, borderline" and verdict(0.5) == "not above null"
    assert verdict(0.01) == "above null, borderline" and verdict(0.2) == "not above null, borderline"
    assert verdict(0.0099) == "above null" and verdict(0.2001) == "not above null"


def test_null_sets_draw_the_methods_own_count_from_one_pool():
    """A pool where only directions 0-2 recover a factor (z, y, rotation): sets of 3 out of 10 recover each of
    them with probability 3/10, so the null mean at tau 0.67 is 0.9; a method that recovers 3 beats it."""
    effect = np.zeros((10, 6))
    effect[0, Z] = effect[1, Y] = effect[2, ROT] = 1.0
    effect[3:, :] = 0.2                                      # the rest move everything a little
    r2 = np.full_like(effect, 0.9)
    null = null_sets(r2, effect, NO_FLOOR, count=3, sets=4000, seed=1)
    assert null["curves"].shape == (4000, len(AREA_TAUS)) and set(null["at"]) == set(TAUS)
    assert null["at"]["0.67"].mean() == pytest.approx(0.9, abs=0.05)
    method = table([row(z_position=1), row(y_offset=1), row(rotation=1)])
    sup = np.asarray(method["curve"], dtype=float)  # the method itself as the supervised row: area 1
    p = significance(method, null)
    exact = 1 / 120  # the one set {0, 1, 2} of C(10, 3) = 120 recovers all three
    assert p["0.67"] == pytest.approx(exact, abs=0.006) and p["auc"] == pytest.approx(exact, abs=0.006)
    assert area(np.asarray(method["curve"]), sup) == pytest.approx(1.0)
    # the area's p compares mean counts over tau (no supervised row needed): the share of null sets whose mean
    # count reaches the method's, counted here by hand
    reach = int(np.sum(null["curves"].mean(1) >= np.mean(method["curve"])))
    assert reach >= 1 and p["auc"] == pytest.approx((1 + reach) / (1 + 4000))


def test_effect_dci_on_known_matrices():
    perfect = effect_dci(np.diag([2.0, 1.0, 3.0, 1.0, 1.0, 1.0]))
    assert perfect["disentanglement"] == pytest.approx(1) and perfect["completeness"] == pytest.approx(1)
    flat = effect_dci(np.ones((6, 6)))
    assert flat["disentanglement"] == pytest.approx(0) and flat["completeness"] == pytest.approx(0)
    two = np.zeros((6, 6))
    for k in range(6):
        two[k, k] = two[k, (k + 1) % 6] = 1.0
    assert effect_dci(two)["disentanglement"] == pytest.approx(1 - np.log(2) / np.log(6))
    noisy = np.eye(6) * 2 + 0.1
    assert effect_dci(noisy, floor=np.full(6, 0.1))["disentanglement"] == pytest.approx(1)
    assert effect_dci(noisy)["disentanglement"] < 0.9


def test_across_seeds_takes_medians_and_needs_two_of_three():
    def seed(s, n, p_auc, auc=0.5):
        return {"seed": s, "recovered_at": {"0.5": n + 1, "0.67": n, "0.8": n - 1}, "auc": auc,
                "p_value": {"0.5": p_auc, "0.67": p_auc, "0.8": p_auc, "auc": p_auc}}

    table = {"matches": {}, "per_seed": [seed(0, 3, 0.01), seed(1, 2, 0.3, 0.4), seed(2, 4, 0.002, 0.7)]}
    out = across_seeds([table])
    assert out["recovered_at"] == {"0.5": 4, "0.67": 3, "0.8": 2} and out["recovered"] == 3
    assert out["auc"] == pytest.approx(0.5) and out["p_value"]["auc"] == pytest.approx(0.01)
    assert out["above_null"] is True and out["verdict"] == "above null, borderline" and len(out["per_seed"]) == 3
    once = across_seeds([dict(table, per_seed=[seed(0, 3, 0.01), seed(1, 2, 0.3), seed(2, 4, 0.4)])])
    assert once["above_null"] is False and once["verdict"] == "not above null"  # below 0.05 on 1 of 3 only
    assert once["seeds_below_05"] == 1 and once["matches_seed"] == 0
    twice = across_seeds([dict(table, per_seed=[seed(0, 3, 0.01), seed(0, 3, 0.01), seed(1, 2, 0.3)])])
    assert [s["seed"] for s in twice["per_seed"]] == [0, 1]                     # a seed counts once
    apart = across_seeds([dict(table, per_seed=[seed(0, 3, 0.01), seed(1, 2, 0.3), seed(0, 5, 0.01)])])
    assert [s["seed"] for s in apart["per_seed"]] == [0, 1] and apart["matches_seed"] == 0  # its first entry, in order
    assert apart["per_seed"][0]["recovered_at"]["0.67"] == 3
    assert twice["recovered_at"]["0.67"] == 2.5                                 # an even count keeps its half
