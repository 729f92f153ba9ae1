"""Send a request set at a chosen arrival rate and concurrency; collect what came back."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import numpy as np
from tqdm import tqdm

from frontend.bench.client import RequestResult, RequestSettings, send_request
from frontend.bench.datasets import SampleRequest

# generous: a saturated CPU server can take minutes per request, and a stuck one should
# fail its requests rather than hang the run forever
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=3 * 60 * 60)


@dataclass(frozen=True)
class LoadShape:
    """How requests arrive: rate in requests/s (inf = all at once), burstiness (gamma shape;
    1 = Poisson), and an optional cap on requests in flight."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None


@dataclass(frozen=True)
class RunOutcome:
    results: list[RequestResult]  # in request order
    duration_s: float  # first send -> last completion


def arrival_offsets(num: int, shape: LoadShape, rng: np.random.Generator) -> list[float]:
    """Seconds from the start at which each request is sent.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate, Poisson at
    burstiness 1, burstier below 1, more regular above. Like vLLM, the schedule is
    stretched so the last request goes out at exactly num/rate: otherwise the random
    total wanders by a few percent and so does the measured throughput from seed to seed.
    """
    if math.isinf(shape.request_rate):
        return [0.0] * num
    if shape.request_rate <= 0 or shape.burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    gaps = rng.gamma(shape.burstiness, 1.0 / (shape.request_rate * shape.burstiness), size=num)
    offsets = np.cumsum(gaps)
    return (offsets * (num / shape.request_rate / offsets[-1])).tolist()


async def run_load(
    requests: list[SampleRequest],
    settings: RequestSettings,
    shape: LoadShape,
    rng: np.random.Generator,
    *,
    warmups: Sequence[SampleRequest] = (),
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> RunOutcome:
    """Send `warmups` one at a time, unmeasured, then `requests` as `shape` says."""
    connector = aiohttp.TCPConnector(limit=shape.max_concurrency or 0)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        for req in warmups:
            await send_request(session, req, settings, clock)
        offsets = arrival_offsets(len(requests), shape, rng)
        gate = asyncio.Semaphore(shape.max_concurrency or len(requests))
        with tqdm(total=len(requests), disable=not progress, unit="req") as bar:

            async def one(req: SampleRequest) -> RequestResult:
                async with gate:
                    result = await send_request(session, req, settings, clock)
                bar.update()
                return result

            loop = asyncio.get_running_loop()
            begin, start = loop.time(), clock()
            tasks = []
            for req, offset in zip(requests, offsets, strict=True):
                # pace on the loop's clock; `clock` only measures (tests replace it)
                await asyncio.sleep(max(0.0, begin + offset - loop.time()))
                tasks.append(asyncio.create_task(one(req)))
            results = await asyncio.gather(*tasks)
            return RunOutcome(list(results), clock() - start)
