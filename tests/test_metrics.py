"""Tests of splitshield.metrics against scikit-image, numpy and hand-computed values.

The reference values come from scikit-image's own metrics run in float64 on real MNIST digits and
CIFAR-10 test images kept in the repository (the ``real_images`` fixture: the package's built-in digits
and tests/data/images.npz), so they are independent of our torch implementation and run on a fresh clone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as scipy_ndimage
import skimage.metrics as skimage_metrics  # a dev dependency: missing, the tests fail rather than skip
import torch

from splitshield.errors import ConfigError
from splitshield.metrics import accuracy, mse, psnr, ssim

# Window name -> the scikit-image arguments that define the same SSIM convention.
SKIMAGE_SSIM_ARGS = {
    "uniform": {},
    "gaussian": {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False},
}
TOL = 1e-4


@pytest.fixture(scope="module")
def samples(real_images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Real images as float32 NHWC-or-NHW arrays in [0, 1], keyed by dataset name."""
    return {name: real_images[name].astype(np.float32) / 255.0 for name in ("mnist", "cifar10")}


def _corrupt(x: np.ndarray, kind: str) -> np.ndarray:
    """A degraded copy of the images ``x`` (float32 in [0, 1], [N, H, W] or [N, H, W, 3])."""
    if kind == "noise":
        rng = np.random.default_rng(0)
        out = x + rng.normal(0.0, 0.1, size=x.shape)
    elif kind == "blur":
        # Blur only the spatial axes: not across images, nor across colour channels.
        sigma = (0.0, 1.0, 1.0) + (0.0,) * (x.ndim - 3)
        out = scipy_ndimage.gaussian_filter(x, sigma=sigma)
    elif kind == "contrast":
        # Changes mean and variance (SSIM's luminance and contrast terms), keeps structure.
        out = 0.6 * x + 0.3
    else:
        raise AssertionError(kind)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    """[N, H, W] or [N, H, W, C] numpy images -> [N, C, H, W] torch tensor."""
    t = torch.from_numpy(x)
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2).contiguous()


def _channel_axis(x: np.ndarray) -> int | None:
    return None if x.ndim == 3 else -1


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
@pytest.mark.parametrize("kind", ["noise", "blur", "contrast"])
@pytest.mark.parametrize("window", ["uniform", "gaussian"])
def test_ssim_matches_skimage(samples: dict[str, np.ndarray], dataset: str, kind: str, window: str) -> None:
    x = samples[dataset]
    x_hat = _corrupt(x, kind)
    expected = np.array(
        [
            skimage_metrics.structural_similarity(
                a.astype(np.float64),
                b.astype(np.float64),
                data_range=1.0,
                channel_axis=_channel_axis(x),
                **SKIMAGE_SSIM_ARGS[window],
            )
            for a, b in zip(x_hat, x, strict=True)
        ]
    )
    got = ssim(_to_nchw(x_hat), _to_nchw(x), window=window, reduction="none")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=TOL)
    mean = ssim(_to_nchw(x_hat), _to_nchw(x), window=window)
    assert mean.item() == pytest.approx(expected.mean(), abs=TOL)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_psnr_and_mse_match_references(samples: dict[str, np.ndarray], dataset: str) -> None:
    x = samples[dataset]
    x_hat = _corrupt(x, "noise")
    expected_psnr = np.array(
        [
            skimage_metrics.peak_signal_noise_ratio(
                b.astype(np.float64), a.astype(np.float64), data_range=1.0
            )
            for a, b in zip(x_hat, x, strict=True)
        ]
    )
    diff = x_hat.astype(np.float64) - x.astype(np.float64)
    expected_mse = (diff**2).reshape(len(x), -1).mean(axis=1)

    got_psnr = psnr(_to_nchw(x_hat), _to_nchw(x), reduction="none")
    got_mse = mse(_to_nchw(x_hat), _to_nchw(x), reduction="none")
    np.testing.assert_allclose(got_psnr.numpy(), expected_psnr, rtol=0, atol=TOL)
    np.testing.assert_allclose(got_mse.numpy(), expected_mse, rtol=1e-5)
    # He et al.'s protocol: PSNR per image, then the mean over images.
    assert psnr(_to_nchw(x_hat), _to_nchw(x)).item() == pytest.approx(expected_psnr.mean(), abs=TOL)
    assert mse(_to_nchw(x_hat), _to_nchw(x)).item() == pytest.approx(expected_mse.mean(), rel=1e-5)


@pytest.mark.parametrize("window", ["uniform", "gaussian"])
def test_ssim_of_identical_images_is_one(window: str) -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x.clone(), window=window, reduction="none"), torch.ones(3), atol=1e-6)


def test_psnr_of_constant_error() -> None:
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    # Every pixel off by 0.1 (image 0) or 0.01 (image 1): MSE 1e-2 and 1e-4, i.e. 20 dB and 40 dB.
    offsets = torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)
    per_image = psnr(x + offsets, x, reduction="none")
    assert per_image.tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    # The mean of per-image PSNRs (30 dB), not the PSNR of the mean MSE (about 23 dB).
    assert psnr(x + offsets, x).item() == pytest.approx(30.0, abs=1e-3)
    # data_range rescales consistently: the same images in [0, 255] have the same PSNR.
    assert psnr(255 * (x + offsets), 255 * x, data_range=255.0).item() == pytest.approx(30.0, abs=1e-3)


def test_psnr_of_identical_images_is_inf() -> None:
    x = torch.rand(2, 1, 8, 8)
    x_hat = x.clone()
    x_hat[1] += 0.1
    per_image = psnr(x_hat, x, reduction="none")
    assert math.isinf(per_image[0].item()) and per_image[0].item() > 0
    assert math.isfinite(per_image[1].item())
    assert psnr(x, x).item() == math.inf
    assert mse(x, x).item() == 0.0


def test_accuracy_hand_made() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.1, 0.2, 0.3], [5.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 2])  # the last row predicts class 0
    assert accuracy(logits, labels) == pytest.approx(0.75)
    assert isinstance(accuracy(logits, labels), float)
    assert accuracy(logits, logits.argmax(dim=1)) == 1.0


def test_reduction_shapes() -> None:
    x = torch.rand(5, 3, 12, 12)
    x_hat = torch.rand(5, 3, 12, 12)
    for metric in (mse, psnr, ssim):
        per_image = metric(x_hat, x, reduction="none")
        mean = metric(x_hat, x)
        assert per_image.shape == (5,)
        assert mean.shape == ()
        assert torch.allclose(mean, per_image.mean())


@pytest.mark.parametrize("window", ["uniform", "gaussian"])
def test_ssim_gradient_flows(window: str) -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x_hat = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    ssim(x_hat, x, window=window).backward()
    assert x_hat.grad is not None
    assert torch.isfinite(x_hat.grad).all()
    assert x_hat.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_metrics_on_cuda_match_cpu() -> None:
    x = torch.rand(2, 3, 16, 16)
    x_hat = torch.rand(2, 3, 16, 16)
    for metric in (mse, psnr, ssim):
        on_gpu = metric(x_hat.cuda(), x.cuda(), reduction="none")
        assert on_gpu.device.type == "cuda"
        assert torch.allclose(on_gpu.cpu(), metric(x_hat, x, reduction="none"), atol=1e-5)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ConfigError, match="x_hat and x must have the same shape"):
        ssim(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 27))
    with pytest.raises(ConfigError, match="x_hat and x"):
        mse(torch.rand(2, 1, 8, 8), torch.rand(3, 1, 8, 8))


def test_three_dimensional_input_is_rejected() -> None:
    with pytest.raises(ConfigError, match="x_hat must be a 4-D"):
        psnr(torch.rand(1, 28, 28), torch.rand(1, 28, 28))
    with pytest.raises(ConfigError, match="x must be a 4-D"):
        ssim(torch.rand(1, 1, 28, 28), torch.rand(1, 28, 28))


def test_image_smaller_than_window_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"window='uniform'.*7x7.*6x6"):
        ssim(torch.rand(1, 1, 6, 6), torch.rand(1, 1, 6, 6))
    # 8x8 is enough for the 7x7 uniform window but not for the 11x11 Gaussian one.
    ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), window="uniform")
    with pytest.raises(ConfigError, match=r"window='gaussian'.*11x11.*8x8"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), window="gaussian")


def test_bad_arguments_are_rejected() -> None:
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(ConfigError, match="window must be one of"):
        ssim(x, x, window="box")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data_range"):
        psnr(x, x, data_range=0.0)
    with pytest.raises(ConfigError, match="data_range"):
        ssim(x, x, data_range=-1.0)
    with pytest.raises(ConfigError, match="reduction"):
        mse(x, x, reduction="sum")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="x_hat must be a float tensor"):
        mse((x * 255).to(torch.uint8), x)
    with pytest.raises(ConfigError, match="labels"):
        accuracy(torch.rand(4, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError, match="labels must be an integer"):
        accuracy(torch.rand(4, 3), torch.tensor([0.0, 1.0, 2.0, 1.0]))
    with pytest.raises(ConfigError, match="logits must be 2-D"):
        accuracy(torch.rand(4), torch.tensor([0, 1, 2, 1]))
    # ConfigError is a ValueError, so generic callers can catch it too.
    with pytest.raises(ValueError):
        ssim(x, x, window="box")  # type: ignore[arg-type]
