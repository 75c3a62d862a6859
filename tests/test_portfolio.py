"""The attack portfolio (``strongest``): per image the member the attacker predicts best, never by the truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import splitshield as ss
from splitshield import metrics
from splitshield.attacks.portfolio import _fit_line, allowed_members
from splitshield.config import parse_spec
from splitshield.errors import ConfigError, ThreatModelError


def _psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return metrics.psnr(x_hat, x, reduction="none").clamp(max=100)


@pytest.fixture(scope="module")
def relu2(trained_lenet, mnist5k):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="white_box", aux=mnist5k.holdout.take(64))
    x, _ = mnist5k.test.take(12).tensors()
    return victim, x, victim.observe(x)


def test_the_portfolio_keeps_per_image_the_member_it_predicts_best(relu2, one_thread):
    victim, x, z = relu2
    # A useless member (one step from grey) and a real one: the attacker must tell them apart by itself.
    members = [{"name": "rmle", "iters": 1, "search": None}, {"name": "rmle", "iters": 150}]
    attack = ss.StrongestAttack(members=members, holdout=8, progress=False).fit(victim)
    x_hat = attack.invert(z)
    weak, strong = (_psnr(m.invert(z), x) for m in attack.members_)
    assert strong.mean() > weak.mean() + 3  # the members really differ
    chosen = attack.chosen_
    assert chosen.shape == (12,) and set(chosen.tolist()) <= {0, 1}
    # Each image is the chosen member's own reconstruction.
    for i, k in enumerate(chosen.tolist()):
        assert torch.equal(x_hat[i], attack.members_[k].invert(z)[i])
    assert _psnr(x_hat, x).mean() >= strong.mean() - 0.5
    assert attack.calibration_["1:rmle"][4] > attack.calibration_["0:rmle"][4]  # mean held-out PSNR


def test_the_same_seed_gives_the_same_reconstructions(relu2, one_thread):
    victim, _, z = relu2
    members = [{"name": "inverse_network", "steps": 30}, {"name": "rmle", "iters": 20}]
    runs = [ss.StrongestAttack(members=members, holdout=8, progress=False).fit(victim) for _ in range(2)]
    assert torch.equal(runs[0].invert(z), runs[1].invert(z))
    assert torch.equal(runs[0].chosen_, runs[1].chosen_)


def test_default_members_are_every_inversion_attack_the_threat_allows():
    # rMLE needs the head, the shadow no queries; model reconstruction runs when named (OPT_IN_MEMBERS)
    assert allowed_members("black_box") == ["inverse_network"]
    assert set(allowed_members("white_box")) >= {"rmle", "inverse_network"}
    assert "strongest" not in allowed_members("white_box") and "model_completion" not in allowed_members("white_box")


def test_the_default_black_box_member_solves_a_linear_decoder(trained_lenet, mnist5k, one_thread):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="black_box", aux=mnist5k.holdout.take(300))
    attack = ss.StrongestAttack(progress=False).fit(victim)
    (member,) = attack.members_
    assert isinstance(member, ss.InverseNetwork) and member.refit
    assert attack.config()["member_defaults"] == {"inverse_network": {"refit": True}}
    assert "member_defaults" not in ss.StrongestAttack(members=["inverse_network"]).config()


def test_threats_without_an_oracle_are_refused_in_one_line(trained_lenet, mnist5k):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="query_free", aux=mnist5k.holdout.take(64))
    with pytest.raises(ThreatModelError, match="needs black_box or white_box access; the victim gives query_free"):
        ss.StrongestAttack().fit(victim)
    with pytest.raises(ConfigError, match="attack 'strongest' runs under threat black_box or white_box"):
        parse_spec({"dataset": "mnist-5k", "splits": ["ReLU2"],
                    "attacks": [{"name": "strongest", "threat": "query_free"}]})


@pytest.mark.parametrize("bad, message", [
    ({"holdout": 2}, "holdout must be >= 4"),
    ({"members": []}, "members must name at least one attack"),
    ({"members": [3]}, "members: each entry is an attack name .*a list there is a grid"),
    ({"members": [{"name": "rmle", "seed": 1}]}, "members: seed and progress are set by the portfolio"),
    ({"members": ["rmlee"]}, "members: 'rmlee' is not an inversion attack a portfolio can run; known: rmle"),
    ({"members": ["strongest"]}, "members: 'strongest' is not an inversion attack"),
    ({"members": {"rmle": {"iterz": 5}}}, "members.rmle.iterz: rmle has no such parameter; it takes iters"),
    ({"members": {"rmle": {"iters": [5, 10]}}}, "members.rmle.iters: one value, not a list"),
    ({"members": {"rmle": {"name": "inverse_network"}}}, "members.rmle: remove 'name'"),
    ({"members": {"rmle": {"iters": 0}}}, "iters must be a positive integer, got 0"),
])
def test_bad_parameters_are_one_line_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        ss.StrongestAttack(**bad)


def test_a_member_that_is_not_an_inversion_attack_is_refused(relu2):
    victim, _, _ = relu2
    with pytest.raises(ConfigError, match="'model_completion' is not an inversion attack"):
        ss.StrongestAttack(members=["model_completion"], holdout=8).fit(victim)


def test_the_prediction_line_is_least_squares_with_a_non_positive_slope():
    rng = np.random.default_rng(0)
    u = rng.normal(size=50)
    v = 3.0 - 2.0 * u + rng.normal(scale=0.1, size=50)
    a, b = _fit_line(torch.tensor(u), torch.tensor(v))
    slope, intercept = np.polyfit(u, v, 1)
    assert (a, b) == pytest.approx((intercept, slope), rel=1e-9)
    a, b = _fit_line(torch.tensor(u), torch.tensor(5.0 + 2.0 * u))  # a rising line is not believed
    assert b == 0.0 and a == pytest.approx(5.0 + 2.0 * u.mean())


def test_a_spec_runs_the_portfolio_white_box_by_default():
    spec = parse_spec({"dataset": "mnist-5k", "splits": ["ReLU2"],
                       "attacks": [{"name": "strongest"}]})
    (setting,) = spec.attack_settings()
    assert setting["name"] == "strongest" and setting["threat"] == "white_box"


def test_aliases_resolve_and_a_mapping_may_leave_parameters_out():
    attack = ss.StrongestAttack(members={"white_box": None, "inverse_network": {"steps": 10}})
    assert attack.members == [{"name": "rmle"}, {"name": "inverse_network", "steps": 10}]


def test_one_member_is_that_member_alone_on_all_the_aux_data(relu2, one_thread):
    victim, _, z = relu2
    portfolio = ss.StrongestAttack(members=[{"name": "rmle", "iters": 20}], progress=False).fit(victim)
    alone = ss.WhiteBoxInversion(iters=20, seed=0, progress=False).fit(victim)
    assert portfolio.fallback_ == 0 and portfolio.calibration_ == {}
    assert torch.equal(portfolio.invert(z), alone.invert(z))


def test_a_member_that_gives_no_number_is_never_chosen(relu2, one_thread, monkeypatch):
    from splitshield import attacks

    class Broken(ss.WhiteBoxInversion):
        name = "broken"

        def invert(self, z):
            return torch.full((z.shape[0], 1, 28, 28), float("nan"))

    monkeypatch.setitem(attacks.ATTACKS, "broken", Broken)
    victim, x, z = relu2
    members = [{"name": "broken", "iters": 1, "search": None}, {"name": "rmle", "iters": 40}]
    attack = ss.StrongestAttack(members=members, holdout=8, progress=False).fit(victim)
    x_hat = attack.invert(z)
    assert torch.all(attack.chosen_ == 1) and torch.isfinite(x_hat).all()
    assert attack.calibration_["0:broken"][0] == float("-inf")


def test_the_engine_records_per_image_which_member_was_kept(tmp_path, one_thread):
    from splitshield.experiment import run_experiment
    from splitshield.report import build_report
    from splitshield.store import ResultStore

    spec = parse_spec({"name": "kept", "dataset": "mnist-5k", "model": "lenet", "splits": ["ReLU2"],
                       "defenses": [{"name": "none"}], "train": {"epochs": 1, "train_n": 300},
                       "attacks": [{"name": "strongest", "holdout": 8,
                                    "members": {"inverse_network": {"steps": 30}, "rmle": {"iters": 20}}},
                                   {"name": "rmle", "iters": 20}]})
    db = tmp_path / "r.db"
    assert run_experiment(spec, db, progress=False).failures == {}
    with ResultStore(db) as store:
        cell = next(c for c in store.cells() if c["attack_label"] == "strongest")
        rows = [r for r in store.metric_rows() if r[0] == cell["hash"] and r[1].startswith("kept:")]
    per_image = {}
    for _, name, index, value in rows:
        per_image.setdefault(index, {})[name] = value
    means = per_image.pop(-1)
    assert set(means) == {"kept:inverse_network", "kept:rmle"}
    assert len(per_image) == 10  # one test image per class
    # Exactly one member is kept for each image, and the means are the shares.
    assert all(sorted(v.values()) == [0.0, 1.0] for v in per_image.values())
    for name, share in means.items():
        assert share == pytest.approx(np.mean([v[name] for v in per_image.values()]))
    md = build_report(db, tmp_path / "report").markdown.read_text()
    assert "images, by the alternative kept (a portfolio's member, a query-free shadow)" in md
    shares = sorted(means.items(), key=lambda t: -t[1])
    assert ", ".join(f"{n.removeprefix('kept:')} {100 * s:.1f} %" for n, s in shares) in md


def test_kept_rows_name_each_alternative_and_number_repeated_members():
    from types import SimpleNamespace

    from splitshield.measure import _kept_rows

    portfolio = ss.StrongestAttack()
    portfolio.members_ = [SimpleNamespace(name=n) for n in ("rmle", "rmle", "inverse_network")]
    portfolio.chosen_ = torch.tensor([2, 0, 2, 1])
    rows = {(name, i): v for name, i, v in _kept_rows(portfolio)}
    assert {name for name, _ in rows} == {"kept:0:rmle", "kept:1:rmle", "kept:inverse_network"}
    assert [rows["kept:inverse_network", i] for i in range(4)] == [1.0, 0.0, 1.0, 0.0]
    assert rows["kept:inverse_network", -1] == 0.5 and rows["kept:0:rmle", -1] == 0.25
    shadows = ss.QueryFreeInversion()
    shadows.match_traffic_, shadows.chosen_ = (0.0, 3.0), torch.tensor([1, 1, 0])
    assert {name for name, _, _ in _kept_rows(shadows)} == {"kept:match_traffic=0", "kept:match_traffic=3"}
    shadows.match_traffic_ = (3.0,)
    assert _kept_rows(shadows) == []
