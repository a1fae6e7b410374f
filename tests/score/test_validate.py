"""The scorer (latentct/score/scoring.py), the known-answer sweeps (latentct/score/validate.py), the factor oracle
(latentct/score/oracle.py) and the supervised ceiling (latentct/discover/baselines.py: supervised)."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from latentct.data import phantom
from latentct.data.phantom import FACTORS
from latentct.discover.baselines import supervised
from latentct.score import oracle as oracle_stage
from latentct.score import validate
from latentct.score.scoring import attribution, effect_dci, line_effects, match_factors, null_summary, recovered_curve
from latentct.util.settings import UserError, parse_settings

# ------------------------------------------------------------------------------------------ the scorer

def test_leakage_and_attribution_on_a_constructed_response():
    eps = torch.linspace(-1, 1, 5)
    values = torch.zeros(2, 5, 3, 6)
    values[0, :, :, 1] = 3 * eps[:, None]        # direction 0 moves factor 1 by 6 over the span ...
    values[0, :, :, 4] = -1 * eps[:, None]       # ... and factor 4 by 2: leakage 2 / 8
    values[1, :, :, 0] = 0.5 * eps[:, None]      # direction 1 moves factor 0 alone
    r2, effect = line_effects(values, eps)
    assert np.allclose(effect[0], [0, 6, 0, 0, 2, 0]) and np.allclose(effect[1], [1, 0, 0, 0, 0, 0])
    own, leakage = attribution(effect)
    assert own.tolist() == [1, 0] and np.allclose(leakage, [0.25, 0.0])
    table = match_factors(r2, effect, r2_min=0.5, leakage_max=0.2)
    assert table["factors"]["y_offset"]["direction"] == 0 and not table["factors"]["y_offset"]["recovered"]
    assert table["factors"]["z_position"]["recovered"] and table["recovered"] == 1
    assert table["directions"][0] == {"direction": 0, "largest": "y_offset", "leakage": 0.25}
    curve = dict(recovered_curve(r2, effect, 0.5, [0.1, 0.3]))
    assert curve == {0.1: 1, 0.3: 2}  # a looser threshold also counts direction 0


def test_effect_dci_on_known_matrices():
    perfect = effect_dci(np.diag([2.0, 1.0, 3.0, 1.0, 1.0, 1.0]))
    assert perfect["disentanglement"] == pytest.approx(1) and perfect["completeness"] == pytest.approx(1)
    flat = effect_dci(np.ones((6, 6)))
    assert flat["disentanglement"] == pytest.approx(0) and flat["completeness"] == pytest.approx(0)
    # every direction moves two factors equally: half the entropy of six
    two = np.zeros((6, 6))
    for k in range(6):
        two[k, k] = two[k, (k + 1) % 6] = 1.0
    assert effect_dci(two)["disentanglement"] == pytest.approx(1 - np.log(2) / np.log(6))
    # a noise floor removes small spurious effects before the entropies
    noisy = np.eye(6) * 2 + 0.1
    assert effect_dci(noisy, floor=np.full(6, 0.1))["disentanglement"] == pytest.approx(1)
    assert effect_dci(noisy)["disentanglement"] < 0.9


def test_per_factor_thresholds():
    eps = torch.linspace(-1, 1, 5)
    values = torch.zeros(2, 5, 3, 6)
    values[0, :, :, 0] = eps[:, None]
    values[0, :, :, 1] = 0.3 * eps[:, None]   # leakage 0.6 / 2.6 = 0.23
    values[1, :, :, 1] = eps[:, None]
    r2, effect = line_effects(values, eps)
    strict = {f: 0.05 for f in FACTORS}
    assert match_factors(r2, effect, 0.5, strict)["recovered"] == 1        # z_position leaks too much for 0.05
    assert match_factors(r2, effect, 0.5, dict(strict, z_position=0.25))["recovered"] == 2


def test_r2_floor_is_what_an_unmoved_factor_reads():
    """r2_min is the line R2 the reader shows on factors a sweep held still (noise here), not the own-factor R2
    of the straight sweeps: a direction that moves its factor along a curve (R2 < 1) still clears it."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.linspace(-1, 1, 5)
    values = 0.02 * torch.randn(6, 5, 40, 6, generator=gen)
    moved = torch.eye(6, dtype=torch.bool)
    for k in range(6):
        values[k, :, :, k] += eps[:, None]
    values[0, :, :, 1] += eps[:, None]          # sweep 0 also moves factor 1: not part of factor 1's floor
    moved[0, 1] = True
    limits = validate.thresholds(values, eps, moved, samples=16, draws=50)
    floors = np.array(list(limits["r2_min"].values()))
    assert 0.05 < floors.min() and floors.max() < 0.7, limits["r2_min"]
    curve = torch.zeros(1, 5, 16, 6)
    curve[0, :, :, 2] = (eps ** 3)[:, None]
    r2, effect = line_effects(curve, eps)
    assert r2[0, 2] < 0.9 and match_factors(r2, effect, limits["r2_min"], 0.1)["recovered"] == 1


def test_null_summary():
    out = null_summary([0, 1, 1, 2, 0, 1], [0.1, 0.2, 0.3, 0.2, 0.1, 0.3])
    assert out["sets"] == 6 and out["recovered"]["mean"] == pytest.approx(5 / 6)
    assert out["recovered"]["p95"] == pytest.approx(np.percentile([0, 1, 1, 2, 0, 1], 95))


# ------------------------------------------------------------------------------------------ known-answer sweeps

def _settings(seed, **kw):
    return validate.Settings(output="unused", seed=seed, image_size=64, patients=6, pair_patients=2, frames=5, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_known_answer_sweeps_score_right_with_exact_factors(seed):
    """The renderer's exact factors in place of the oracle: every sweep goes to its own factor, cleanly, every
    pair has its two factors on top, and the anatomy report labels at least 5 of 6 factors as declared."""
    result = validate.validate(_settings(seed))
    for f, sweep in result["sweeps"].items():
        assert sweep["attributed"] == f and sweep["leakage"] <= validate.LEAKAGE_TARGET, (f, sweep)
    assert all(p["ok"] for p in result["pairs"]) and len(result["pairs"]) == 15
    assert result["checks"]["labels_ok"] >= 5, {f: s["label"] for f, s in result["sweeps"].items()}
    assert result["checks"]["passed"]
    assert sum(result["confusion"]["rotation"].values()) == 6
    # exact factors move only their own factor: a clean change scores leakage 0, and a factor a sweep held
    # still reads as a flat line, so the R2 floor a direction must beat is 0
    assert max(result["thresholds"]["leakage_max"].values()) < 1e-6
    assert max(result["thresholds"]["r2_min"].values()) == 0


def test_a_sweep_moves_only_its_factor():
    hu_a, exact_a = validate.render_sweep((0, ("rotation",), 0, 3, 64, 32))
    assert exact_a[:, 2].tolist() == pytest.approx([-15, 0, 15]) and np.ptp(exact_a[:, [0, 1, 3, 4, 5]], 0).max() == 0
    assert not np.array_equal(hu_a[0], hu_a[-1])
    _, exact_b = validate.render_sweep((0, ("z_position", "breast_size"), 0, 3, 64, 32))
    assert exact_b[:, 0].tolist() == pytest.approx([0.1, 0.5, 0.9])
    _, exact_z = validate.render_sweep((0, ("z_position",), 1, 3, 64, 32))
    assert (exact_z[:, 5] == 0).all()  # z sweeps on patients without breasts


# ------------------------------------------------------------------------------------------ the oracle

def test_oracle_learns_cached_and_named_by_hash(tiny_oracle, capsys):
    cfg, path, r2 = tiny_oracle
    assert path.parent.name == "32px_hu-1000_2000_render64_phantom1" and set(r2) == set(FACTORS)
    assert r2["width"] > 0.5 and r2["y_offset"] > 0.5  # even 150 tiny steps read the body's size and height
    oracle = oracle_stage.load_oracle(path)
    before = path.stat().st_mtime_ns
    assert oracle_stage.main(cfg) == oracle.r2 and path.stat().st_mtime_ns == before  # reused, not retrained
    assert "reused" in capsys.readouterr().out and len(oracle.sha256) == 64
    hu, targets = oracle_stage.render_slices(8, 32, seed=5, stream=9, render_size=64)
    read = oracle.read(oracle_stage.hu_to_unit(hu, "default"))
    assert read.shape == (8, 6) and torch.isfinite(read).all()
    with pytest.raises(UserError, match="32 px"):
        oracle.read(torch.zeros(1, 1, 64, 64))


def test_oracle_from_another_phantom_version_is_refused(tiny_oracle, tmp_path):
    state = torch.load(tiny_oracle[1], weights_only=True)
    state["phantom_version"] = phantom.PHANTOM_VERSION + 1
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(UserError, match="phantom version"):
        oracle_stage.load_oracle(tmp_path / "old.pt")


def test_validate_command_writes_the_schema(tiny_oracle, tmp_path):
    cfg = parse_settings(validate.Settings, ["--output", str(tmp_path / "v"), "--image-size", "32", "--oracle",
                                             str(tiny_oracle[1]), "--patients", "2", "--pair-patients", "1",
                                             "--frames", "3", "--render-size", "64"])
    validate.main(cfg)
    out = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert out["image_size"] == 32 and out["seed"] == 0 and len(out["oracle_sha256"]) == 64
    assert set(out["oracle"]) == set(FACTORS) and all("r2_generated" in v for v in out["oracle"].values())
    assert set(out["sweeps"]) == set(FACTORS)
    assert {"attributed", "leakage", "label", "expected_label"} <= set(out["sweeps"]["rotation"])
    assert all(set(p) >= {"factors", "top_two"} for p in out["pairs"])
    assert all(0 <= v <= 1 for v in out["thresholds"]["leakage_max"].values()) and set(out["noise_floor"]) == set(FACTORS)
    assert set(out["thresholds"]["r2_min"]) == set(FACTORS) and out["thresholds_from"] == "known-answer sweeps"


# ------------------------------------------------------------------------------------------ supervised ceiling

class FactorToy(nn.Module):
    """Images that spell out six factors linearly in z (one pixel each), and an oracle that reads them back."""

    latent_dim = 10

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.B = nn.Parameter(torch.randn(6, self.latent_dim, generator=gen), requires_grad=False)

    def forward(self, z):
        img = torch.zeros(len(z), 1, 4, 4)
        img[:, 0, 0, :4] = 0.1 * (z @ self.B.t())[:, :4]
        img[:, 0, 1, :2] = 0.1 * (z @ self.B.t())[:, 4:]
        return img


class ToyOracle:
    window = (-1000.0, 2000.0)

    def read(self, images):
        return torch.cat([images[:, 0, 0, :4], images[:, 0, 1, :2]], 1) * 10


def test_supervised_directions_move_one_factor_and_hold_the_others():
    toy = FactorToy()
    directions, info = supervised(toy, ToyOracle(), ToyOracle.window, samples=256)
    moved = directions @ toy.B.t()  # factor change per unit step along each direction
    assert torch.allclose(moved - torch.diag(torch.diagonal(moved)), torch.zeros(6, 6), atol=1e-4)
    assert (torch.diagonal(moved) > 0).all()
    assert all(v > 0.999 for v in info["fit_r2"].values())
    singular = torch.linalg.svdvals(toy.B)
    assert info["condition_number"] == pytest.approx(float(singular.max() / singular.min()), rel=1e-4)
    assert info["per_unit_shift"]["rotation"] == pytest.approx(float(moved[2, 2]), rel=1e-4)
