"""A curious cloud attacks with what it holds: ``splitshield attack CLOUD.safetensors --transcript T``.

The attacker gets the cloud artifact (the tail's weights, the head's architecture) and the features it
recorded, never a head weight: the view handed to the attack is captured and compared with the real head.
The model is an untrained LeNet built from the zoo's default seed, so a head naively rebuilt from the
artifact's model spec would hold exactly the real head's weights: the test would see it.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_cli_errors import one_line_error  # exit 2, one line naming the fields
from typer.testing import CliRunner

import splitshield as ss
from splitshield.attacks import ArchitectureOnlyView, QueryFreeInversion, QueryFreeView, UnSplit
from splitshield.attacks.base import Attack
from splitshield.cli import app
from splitshield.errors import CheckpointError
from splitshield.runtime.artifacts import export, load_cloud
from splitshield.runtime.codec import CodecOptions, encode
from splitshield.runtime.transcript import TranscriptWriter

RECORDED = 6  # features in the transcript: 3 requests of 2 images


@pytest.fixture(scope="module")
def cloud_setup(tmp_path_factory: pytest.TempPathFactory, mnist5k) -> dict:
    """An untrained LeNet cut at ReLU2, exported, and a transcript of 6 built-in test images' features."""
    root = tmp_path_factory.mktemp("cloud")
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=mnist5k.image_shape)
    checkpoint = ss.save_checkpoint(root / "lenet", target)
    export(checkpoint, root / "edge.safetensors", root / "cloud.safetensors")
    x = mnist5k.test.take(RECORDED).tensors()[0]
    writer = TranscriptWriter(root / "transcript.db")
    with torch.no_grad():
        for i, codec in enumerate((CodecOptions(), CodecOptions("float16"), CodecOptions("uint8", "zstd"))):
            writer.append(encode(target.head(x[2 * i : 2 * i + 2]), codec), batch=2)
    writer.close()
    return {"target": target, "checkpoint": checkpoint, "edge": root / "edge.safetensors",
            "cloud": root / "cloud.safetensors", "transcript": root / "transcript.db"}


def run(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def capture_views(monkeypatch: pytest.MonkeyPatch, cls: type[Attack]) -> list:
    """Every view ``cls`` is fitted on, as the attack receives it."""
    views: list = []
    original = cls._fit

    def spy(self, view):
        views.append(view)
        return original(self, view)

    monkeypatch.setattr(cls, "_fit", spy)
    return views


def assert_no_head_weight(head_architecture, real_head: torch.nn.Module) -> None:
    """Heads of the view's architecture share the real head's shapes and none of its weights."""
    real = dict(real_head.named_parameters())
    for _ in range(2):
        clone = dict(head_architecture().named_parameters())
        assert clone.keys() == real.keys()
        for name, p in clone.items():
            assert p.shape == real[name].shape
            assert not torch.equal(p, real[name]), f"{name} is the real head's"


def test_shadow_head_from_the_cloud_artifact(cloud_setup, tmp_path, monkeypatch, one_thread) -> None:
    views = capture_views(monkeypatch, QueryFreeInversion)
    out = tmp_path / "shadow"
    result = run("attack", cloud_setup["cloud"], "--transcript", cloud_setup["transcript"], "--attack", "shadow_head",
                 "--aux-n", 64, "--options", '{"steps": 5, "batch_size": 16, "iters": 5}', "--out", out)
    assert result.exit_code == 0, result.output
    assert "non-adaptive" in result.output and "no defense" in result.output
    saved = load_file(str(out / "reconstructions.safetensors"))
    assert saved["x_hat"].shape == (RECORDED, 1, 28, 28) and saved["received_at"].shape == (RECORDED,)
    assert 0 <= float(saved["x_hat"].min()) and float(saved["x_hat"].max()) <= 1
    assert (out / "transcript_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (view,) = views
    assert isinstance(view, QueryFreeView) and not hasattr(view, "head") and not view.adaptive
    assert len(view.aux) == 64 and view.traffic is not None and view.traffic.count == RECORDED
    real = cloud_setup["target"]
    assert_no_head_weight(view.head_architecture, real.head)
    # The tail is the real tail; without a defense the mechanism is the identity.
    for name, t in real.tail.state_dict().items():
        assert torch.equal(view.tail.state_dict()[name], t)
    z = torch.rand(2, 16, 8, 8)
    assert torch.equal(view.obfuscate(z), z)


def test_unsplit_from_the_cloud_artifact(cloud_setup, tmp_path, monkeypatch, one_thread) -> None:
    views = capture_views(monkeypatch, UnSplit)
    out = tmp_path / "unsplit"
    result = run("attack", cloud_setup["cloud"], "--transcript", cloud_setup["transcript"], "--attack", "unsplit",
                 "--limit", 4, "--options", '{"rounds": 2, "input_iters": 3, "model_iters": 3, "restarts": 1}',
                 "--out", out)
    assert result.exit_code == 0, result.output
    assert "non-adaptive" in result.output
    assert load_file(str(out / "reconstructions.safetensors"))["x_hat"].shape == (4, 1, 28, 28)
    (view,) = views
    assert isinstance(view, ArchitectureOnlyView) and view.aux is None and not view.adaptive
    assert not hasattr(view, "head") and not hasattr(view, "tail")
    assert_no_head_weight(view.head_architecture, cloud_setup["target"].head)


def test_load_cloud_keeps_the_architecture_not_the_weights(cloud_setup) -> None:
    cloud = load_cloud(cloud_setup["cloud"], architecture=True)
    real = cloud_setup["target"].head
    assert_no_head_weight(lambda: cloud.head_architecture, real)
    assert load_cloud(cloud_setup["cloud"]).head_architecture is None  # the server keeps no head
    with pytest.raises(CheckpointError, match="full checkpoint"):
        load_cloud(cloud_setup["checkpoint"], allow_head_weights=True, architecture=True)


@pytest.mark.parametrize(("args", "names"), [
    (["--attack", "rmle"], ["white_box", "head's weights", "full checkpoint"]),
    (["--attack", "inverse_network"], ["black_box", "queries", "full checkpoint"]),
    (["--attack", "model_completion"], ["black_box", "queries"]),
    (["--attack", "model_reconstruction"], ["black_box", "queries"]),  # it rebuilds the head from queries
    (["--attack", "inverse_network", "--threat", "white_box"], ["white_box", "head's weights"]),
    (["--attack", "shadow_head", "--image-shape", "3,32,32"], ["--dataset", "--image-shape"]),
])
def test_threats_beyond_the_cloud_are_refused(cloud_setup, monkeypatch, args, names) -> None:
    monkeypatch.setattr(Attack, "fit", lambda *_: pytest.fail("fitted before refusing"))
    one_line_error(run("attack", cloud_setup["cloud"], "--transcript", cloud_setup["transcript"], *args), *names)


@pytest.mark.parametrize("attack", ["shadow_head", "unsplit"])
def test_cloud_artifact_without_transcript_is_refused(cloud_setup, monkeypatch, attack) -> None:
    monkeypatch.setattr(Attack, "fit", lambda *_: pytest.fail("fitted before refusing"))
    one_line_error(run("attack", cloud_setup["cloud"], "--attack", attack), "--transcript", "full checkpoint")


def test_an_unwritable_out_is_refused_before_fitting(cloud_setup, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(Attack, "fit", lambda *_: pytest.fail("fitted before refusing"))
    (tmp_path / "taken").write_text("")
    for checkpoint in (cloud_setup["cloud"], cloud_setup["checkpoint"]):
        one_line_error(run("attack", checkpoint, "--attack", "shadow_head", "--transcript", cloud_setup["transcript"],
                           "--out", tmp_path / "taken"), "--out")


def test_edge_artifact(cloud_setup, tmp_path, one_thread) -> None:
    """The edge artifact holds the head: white-box on the transcript works, query-free (needs the tail) does not."""
    one_line_error(run("attack", cloud_setup["edge"], "--attack", "shadow_head", "--transcript",
                       cloud_setup["transcript"]), "query_free", "edge artifact", "cloud artifact")
    out = tmp_path / "edge"
    result = run("attack", cloud_setup["edge"], "--attack", "rmle", "--options", '{"iters": 3}', "--transcript",
                 cloud_setup["transcript"], "--limit", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert load_file(str(out / "reconstructions.safetensors"))["x_hat"].shape == (2, 1, 28, 28)


def test_fresh_copy_keeps_no_weight_of_the_original() -> None:
    """Also parameters of modules without reset_parameters (a ViT's position embedding, attention's in_proj)."""
    from torch import nn

    from splitshield.models.split import fresh_copy

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 4, 8))
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.attn(x + self.pos, x, x)[0])

    torch.manual_seed(0)
    block = Block()
    with torch.no_grad():  # "trained": every weight moved away from any default initialisation
        for p in block.parameters():
            p.add_(torch.randn_like(p))
    clone = fresh_copy(block)
    for (name, trained), (_, fresh) in zip(block.named_parameters(), clone.named_parameters(), strict=True):
        assert not torch.isclose(trained, fresh).any(), name
