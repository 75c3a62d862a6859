"""Tests of dynamic batching: the :class:`DynamicBatcher` with a fake tail, and the server app using it.

Logits are compared with ``torch.allclose(atol=1e-5)``, not exact equality: a batched matmul/conv may
sum in another order (other blocking, other SIMD lanes) than the same rows run alone, which changes the
last bits of float32 results; it does not change any row by more than rounding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

import splitshield as ss
from splitshield.errors import ConfigError
from splitshield.runtime.batcher import DynamicBatcher, check_batching
from splitshield.runtime.codec import encode

TOKEN = "batch-token-0123456789"
FEATURE = (16, 8, 8)  # LeNet ReLU2


class FakeTail:
    """A linear tail ``[N, 4] -> [N, 3]`` that records the batches it is called with.

    ``during_first``: called inside the first call, while the batch runs (the event loop is busy with it),
    e.g. to submit requests that then arrive behind it. ``poison``: a batch holding a row whose first value
    is this raises.
    """

    def __init__(self, during_first: Callable[[], None] | None = None, poison: float | None = None):
        torch.manual_seed(0)
        self.weight = torch.randn(4, 3)
        self.during_first, self.poison = during_first, poison
        self.batches: list[tuple[int, ...]] = []

    def alone(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.batches.append(tuple(z.shape))
        if self.during_first is not None and len(self.batches) == 1:
            self.during_first()
        if self.poison is not None and bool((z[:, 0] == self.poison).any()):
            raise RuntimeError("poisoned batch")
        return z @ self.weight


async def _submit_all(batcher: DynamicBatcher, inputs: list[torch.Tensor]) -> list[torch.Tensor | BaseException]:
    return await asyncio.gather(*(batcher.submit(z) for z in inputs), return_exceptions=True)


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    tail = FakeTail()
    batcher = DynamicBatcher(tail, max_batch=8, max_delay_ms=50)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1 + i % 4, 4, generator=gen) for i in range(20)]  # 50 rows, 1..4 per request
    results = asyncio.run(_submit_all(batcher, inputs))
    for z, logits in zip(inputs, results, strict=True):
        assert isinstance(logits, torch.Tensor) and logits.shape == (z.shape[0], 3)
        assert torch.allclose(logits, tail.alone(z), atol=1e-5)  # this request's rows, in its order
    assert batcher.calls == len(tail.batches) < len(inputs)
    assert all(rows <= 8 for rows, _ in tail.batches)  # max_batch respected
    assert sum(rows for rows, _ in tail.batches) == 50


def test_no_delay_runs_one_request_at_once_and_batches_those_that_arrive_together() -> None:
    async def run(tail: FakeTail, batcher: DynamicBatcher, rest: list) -> list[torch.Tensor | BaseException]:
        first = asyncio.ensure_future(batcher.submit(torch.ones(1, 4)))
        result = await first  # alone: run at once, no clock to wait on
        return [result, *await asyncio.gather(*rest)]

    rest: list[asyncio.Future] = []
    loop_batcher: list[DynamicBatcher] = []

    def arrive() -> None:  # five requests arrive while the first batch runs
        rest.extend(asyncio.ensure_future(loop_batcher[0].submit(torch.full((2, 4), float(i)))) for i in range(5))

    tail = FakeTail(during_first=arrive)
    loop_batcher.append(DynamicBatcher(tail, max_batch=64, max_delay_ms=0))
    results = asyncio.run(run(tail, loop_batcher[0], rest))
    assert tail.batches == [(1, 4), (10, 4)]  # the five that arrived together ran as one batch
    for i, logits in enumerate(results[1:]):
        assert torch.allclose(logits, tail.alone(torch.full((2, 4), float(i))), atol=1e-5)


def test_a_failing_tail_call_fails_only_its_batch() -> None:
    inputs = [torch.ones(1, 4), torch.ones(1, 4), torch.full((1, 4), -1.0), torch.ones(1, 4), torch.ones(1, 4)]
    rest: list[asyncio.Future] = []
    holder: list[DynamicBatcher] = []
    tail = FakeTail(during_first=lambda: rest.extend(asyncio.ensure_future(holder[0].submit(z)) for z in inputs[1:]),
                    poison=-1.0)
    holder.append(DynamicBatcher(tail, max_batch=2, max_delay_ms=0))

    async def run() -> list[torch.Tensor | BaseException]:
        first = await asyncio.gather(holder[0].submit(inputs[0]), return_exceptions=True)
        return [*first, *await asyncio.gather(*rest, return_exceptions=True)]

    results = asyncio.run(run())
    assert tail.batches == [(1, 4), (2, 4), (2, 4)]  # [A], [B, poison], [D, E]
    assert [isinstance(r, RuntimeError) for r in results] == [False, True, True, False, False]
    for z, r in zip(inputs, results, strict=True):
        if isinstance(r, torch.Tensor):
            assert torch.allclose(r, tail.alone(z), atol=1e-5)


def test_requests_of_another_feature_shape_are_not_mixed_in() -> None:
    seen: list[tuple[int, ...]] = []

    def tail(z: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(z.shape))
        return z.flatten(1).sum(1, keepdim=True)

    batcher = DynamicBatcher(tail, max_batch=16, max_delay_ms=20)
    inputs = [torch.ones(1, 4), torch.ones(2, 5), torch.ones(1, 4)]
    results = asyncio.run(_submit_all(batcher, inputs))
    assert [r.tolist() for r in results] == [[[4.0]], [[5.0], [5.0]], [[4.0]]]
    assert seen == [(1, 4), (2, 5), (1, 4)]  # in arrival order; a batch never mixes feature shapes


def test_batching_options_are_one_line_errors() -> None:
    check_batching(1, 0)
    check_batching(256, 2.5)
    for max_batch, delay, option in ((0, 2, "--max-batch"), (True, 2, "--max-batch"), (8, -1, "--max-delay-ms"),
                                     (8, float("nan"), "--max-delay-ms"), (8, 1e9, "--max-delay-ms")):
        with pytest.raises(ConfigError, match=option) as info:
            check_batching(max_batch, delay)
        assert "\n" not in str(info.value)


def test_module_entry_point_refuses_a_bad_max_delay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from splitshield.runtime.server import main

    (tmp_path / "token.txt").write_text(TOKEN)
    code = main([str(tmp_path / "missing.safetensors"), "--token-file", str(tmp_path / "token.txt"),
                 "--max-delay-ms", "-3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--max-delay-ms" in err and "\n" not in err


# -- the server app: batched tail, one transcript row per request -----------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
    return ss.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lenet", target)


def _post_all(app, frames: list[bytes]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            return await asyncio.gather(*(client.post("/v1/infer", content=frame, headers={"X-Request-Id": f"r{i}"})
                                          for i, frame in enumerate(frames)))

    return asyncio.run(run())


def test_served_requests_are_batched_equal_alone_and_recorded_once_each(checkpoint: Path, tmp_path: Path) -> None:
    from splitshield.runtime.server import TailService, create_app
    from splitshield.runtime.transcript import read_records

    service = TailService(checkpoint, max_batch=16, allow_head_weights=True)
    forward, batches = service.forward, []
    service.forward = lambda z: (batches.append(z.shape[0]), forward(z))[1]  # count the tail's calls
    db = tmp_path / "transcript.db"
    app = create_app(service, TOKEN, record=db, threads=1, max_delay_ms=50)
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.rand(1 + i % 3, *FEATURE, generator=gen) for i in range(12)]  # 24 rows
    responses = _post_all(app, [encode(z) for z in inputs])
    for i, (z, r) in enumerate(zip(inputs, responses, strict=True)):
        assert r.status_code == 200, r.text
        assert r.json()["request_id"] == f"r{i}"
        assert torch.allclose(torch.tensor(r.json()["logits"]), forward(z), atol=1e-5)
    assert len(batches) < len(inputs) and max(batches) <= 16 and sum(batches) == 24
    records = read_records(db)
    assert sorted(request_id for _, _, request_id, _ in records) == sorted(f"r{i}" for i in range(12))


def test_a_failing_tail_is_an_internal_error_and_the_server_goes_on(checkpoint: Path) -> None:
    from splitshield.runtime.server import TailService, create_app

    service = TailService(checkpoint, max_batch=4, allow_head_weights=True)
    forward = service.forward
    app = create_app(service, TOKEN, max_delay_ms=0)
    service.forward = lambda z: (_ for _ in ()).throw(RuntimeError("boom"))
    r, = _post_all(app, [encode(torch.rand(1, *FEATURE))])
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "tail failed" in r.json()["error"]["message"]
    service.forward = forward
    r, = _post_all(app, [encode(torch.rand(1, *FEATURE))])
    assert r.status_code == 200
