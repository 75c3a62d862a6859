"""The Gaussian-channel bound on I(x; z) is certified and the conditional-entropy floor is an estimate: both checked
against closed forms (Gaussian images through a linear head) and exact posteriors (binary images), then through
the cell pipeline and the report."""

from __future__ import annotations

import math

import pytest
import torch

from splitshield.defenses import Dropout, FeatureBound, GaussianNoise
from splitshield.errors import ConfigError
from splitshield.measure import ce_floor, measure_target, mi_bound
from splitshield.metrics import conditional_entropy_floor, gaussian_channel_bound, mse
from splitshield.models import build_model, split
from splitshield.report import BOUND_EXPLANATION, FLOOR_EXPLANATION, build_report
from splitshield.store import CellRecord, ResultStore

D, K, SIGMA, N = 6, 3, 0.1, 40_000


@pytest.fixture(scope="module")
def gaussian_case() -> dict[str, torch.Tensor]:
    """x ~ N(0.5, Σ) on 1×2×3 "images", a linear head ẑ = A(x − 0.5) with correlated outputs, and the closed
    forms for z = ẑ + N(0, σ²I): I(x; z), the per-dimension bound, the posterior covariance."""
    g = torch.Generator().manual_seed(0)
    root = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.05
    cov_x = root @ root.T + 1e-3 * torch.eye(D, dtype=torch.float64)
    head = torch.randn(K, D, generator=g, dtype=torch.float64)
    head[1] = head[0] + 0.3 * head[1]  # two strongly correlated feature dimensions: Hadamard is strict
    cov_z = head @ cov_x @ head.T
    noise = SIGMA**2 * torch.eye(K, dtype=torch.float64)
    x = 0.5 + torch.randn(N, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov_x).T
    cross = cov_x @ head.T
    return {
        "x": x.view(N, 1, 2, 3), "z": (x - 0.5) @ head.T, "head": head, "cov_x": cov_x, "cross": cross,
        "cov_z_noisy": cov_z + noise,
        "mi": 0.5 * torch.logdet(torch.eye(K, dtype=torch.float64) + cov_z / SIGMA**2),
        "hadamard": 0.5 * torch.log1p(torch.diagonal(cov_z) / SIGMA**2).sum(),
        "posterior": cov_x - cross @ torch.linalg.solve(cov_z + noise, cross.T),
    }


def test_channel_bound_is_the_hadamard_bound_and_above_the_true_information(gaussian_case):
    case = gaussian_case
    bound = gaussian_channel_bound(case["z"], SIGMA)
    assert bound == pytest.approx(case["hadamard"].item(), rel=0.02)
    assert case["hadamard"] > 1.2 * case["mi"]  # correlated outputs: the bound is strict here...
    assert bound >= case["mi"].item()
    # ...and reached when the feature's elements are independent Gaussians: ẑ = x's first three pixels, Σ diagonal.
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64)
    independent = torch.randn(N, 3, generator=g, dtype=torch.float64) * scales
    exact = 0.5 * torch.log1p(scales**2 / SIGMA**2).sum().item()
    assert gaussian_channel_bound(independent, SIGMA) == pytest.approx(exact, rel=0.02)


def test_floor_is_the_posteriors_geometric_mean_and_below_the_mmse(gaussian_case):
    case = gaussian_case
    result = conditional_entropy_floor(case["x"], case["z"], SIGMA, pixel_variance=1e-12)
    eigenvalues = torch.linalg.eigvalsh(case["posterior"])
    geometric, mmse = eigenvalues.log().mean().exp().item(), eigenvalues.mean().item()
    assert result["mse_floor"] == pytest.approx(geometric, rel=0.03)
    assert result["mi_upper"] == pytest.approx(case["mi"].item(), rel=0.02)  # its own channel bound is exact here
    assert geometric < 0.8 * mmse  # an anisotropic posterior: the floor is loose by construction
    # The best estimator (linear for Gaussians) reaches the MMSE on a fresh noise draw, never the floor.
    g = torch.Generator().manual_seed(2)
    z = case["z"] + SIGMA * torch.randn(case["z"].shape, generator=g, dtype=torch.float64)
    gain = torch.linalg.solve(case["cov_z_noisy"], case["cross"].T)  # E[x|z] = 0.5 + Σ_xz Σ_z⁻¹ z
    best = (0.5 + z @ gain).view_as(case["x"])
    assert mse(best, case["x"]).item() == pytest.approx(mmse, rel=0.03)
    assert result["mse_floor"] < mse(best, case["x"]).item()


@pytest.mark.parametrize("pixel_variance", [1e-12, 1.0 / (12 * 255**2), 3e-3, 3e-2])
def test_dequantisation_keeps_the_floor_below_the_mmse_at_any_pixel_variance(gaussian_case, pixel_variance):
    # The floor is the dequantised images' (x + u: entropy from Cov(x) + p·I) minus p, the variance u adds to any
    # reconstruction's MSE. It stays below the MMSE of x for every p; taking max(eigenvalue, p) instead, without
    # subtracting p, would put it above the MMSE at p = 3e-2.
    case = gaussian_case
    floor = conditional_entropy_floor(case["x"], case["z"], SIGMA, pixel_variance=pixel_variance)["mse_floor"]
    dequantised = torch.linalg.eigvalsh(case["cov_x"]) + pixel_variance
    expected = max(0.0, dequantised.log().mean().exp().item() * math.exp(-2 * case["mi"].item() / D) - pixel_variance)
    mmse = torch.linalg.eigvalsh(case["posterior"]).mean().item()
    assert floor == pytest.approx(expected, rel=0.03, abs=1e-9)
    assert floor < mmse


def test_floor_errs_high_on_binary_images_while_the_bound_holds():
    """Pixels 0 or 1 with probability ½ (8-bit levels 0 and 255) seen through z = x + N(0, σ²): the exact posterior
    mean is a logistic function of z. Their entropy is far below a Gaussian's of the same variance, so the floor
    exceeds the true MMSE (what the docstring warns of), while the channel bound stays above the true I(x; z)."""
    sigma, n = 0.2, 200_000
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (n, 1, 2, 2), generator=g).double()
    z = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    posterior = torch.sigmoid((z - 0.5) / sigma**2)  # P(x = 1 | z), per pixel
    true_mmse = (posterior * (1 - posterior)).mean().item()
    entropy = -(torch.special.xlogy(posterior, posterior) + torch.special.xlogy(1 - posterior, 1 - posterior))
    true_information = 4 * (math.log(2) - entropy.mean().item())  # nats per image of 4 independent pixels
    floor = conditional_entropy_floor(x, x.flatten(1), sigma)["mse_floor"]
    assert floor > 3 * true_mmse
    assert gaussian_channel_bound(x.flatten(1), sigma) > true_information


def test_bad_input_is_one_line():
    with pytest.raises(ConfigError, match="sigma must be > 0"):
        gaussian_channel_bound(torch.rand(10, 4), 0.0)
    with pytest.raises(ConfigError, match="N >= 2"):
        gaussian_channel_bound(torch.rand(1, 4), 1.0)


def test_the_pipeline_takes_the_bound_where_the_noise_is_added(mnist5k, one_thread):
    torch.manual_seed(0)
    target = split(build_model("lenet"), "ReLU2", input_shape=mnist5k.image_shape).eval()
    x, y = mnist5k.train.take(600).tensors()
    with torch.no_grad():
        z = target.head(x)
    assert mi_bound(x, target, GaussianNoise(0.5)) == pytest.approx(gaussian_channel_bound(z, 0.5), rel=1e-9)
    # Gaussian parts in a row act as one of their summed variance; without Gaussian noise there is neither number.
    two = mi_bound(x, target, GaussianNoise(0.3) + GaussianNoise(0.4))
    assert two == pytest.approx(gaussian_channel_bound(z, 0.5), rel=1e-9)
    assert mi_bound(x, target, Dropout(0.5)) is None and ce_floor(x, y, target, Dropout(0.5)) is None
    # A part before the noise changes the feature the bound is taken on: a tanh bound's.
    bounded = mi_bound(x, target, FeatureBound("tanh") + GaussianNoise(0.5))
    assert bounded == pytest.approx(gaussian_channel_bound(torch.tanh(z), 0.5), rel=1e-9)
    rows = dict((name, value) for name, _, value in measure_target(
        target, GaussianNoise(0.5), mnist5k, seed=0, metrics=["ce_floor", "mi_bound"]))
    assert set(rows) == {"ce_floor", "mi_bound"} and rows["mi_bound"] > 0 and rows["ce_floor"] >= 0


def _store(db, metrics_per_defense: dict[str, dict[str, float]]) -> None:
    from splitshield.experiment import RESULTS_REVISION

    with ResultStore(db) as store:
        run = store.start_run("bound", {}, "local", 1)
        for i, (label, metrics) in enumerate(metrics_per_defense.items()):
            defense = {"name": "none"} if label == "none" else {"name": "gaussian_noise", "sigma": 0.5}
            store.register_cells(run, [{
                "hash": f"c{i}", "target_hash": f"t{i}", "dataset": "mnist", "model": "lenet", "split": "ReLU2",
                "defense": defense, "defense_label": label, "attack": {"name": "rmle"}, "attack_label": "rmle",
                "seed": 0, "config": {"revision": RESULTS_REVISION}}])
            rows = [("accuracy", -1, 0.9), ("ssim", -1, 0.5), ("psnr", -1, 12.0), ("mse", -1, 0.05)]
            store.record(CellRecord(f"c{i}", rows + [(k, -1, v) for k, v in metrics.items()], {}, {}))


def test_report_shows_the_bound_beside_the_floor_and_reads_old_stores(tmp_path):
    new, old = tmp_path / "new" / "results.db", tmp_path / "old" / "results.db"
    for db in (new, old):
        db.parent.mkdir()
    _store(new, {"none": {}, "gaussian_noise(sigma=0.5)": {"ce_floor": 2.5e-4, "mi_bound": 123.4}})
    _store(old, {"none": {}, "gaussian_noise(sigma=0.5)": {"ce_floor": 2.5e-4}})  # written before mi_bound
    text = build_report(new, tmp_path / "new-report").markdown.read_text()
    assert "| CE floor estimate (MSE) | I(x;z) bound (nats) |" in text
    assert "| 0.00025 | 123 |" in text and FLOOR_EXPLANATION in text and BOUND_EXPLANATION in text
    text = build_report(old, tmp_path / "old-report").markdown.read_text()
    assert "| CE floor estimate (MSE) |" in text and "| 0.00025 |" in text and FLOOR_EXPLANATION in text
    assert "I(x;z)" not in text
