"""/dashboard on a real disaggregated server (1 prefill + 1 decode worker, --api-key) under
a few streaming requests: the stats endpoint, the pool-advice gauge on /metrics, and the
page itself in headless Chromium, whose DOM values are checked against /metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from browser import PageValues, chromium, dump_dom, pixel_spread, screenshot
from prometheus_client.parser import text_string_to_metric_families
from server_process import server_process

pytestmark = pytest.mark.slow

KEY = "dash-key-7"
ARGS = ["--served-model-name", "tiny", "--max-model-len", "256", "--kv-cache-memory", "32MiB",
        "--max-num-seqs", "8", "--prefill-workers", "1", "--decode-workers", "1",
        "--api-key", KEY, "--disable-log-requests"]  # fmt: skip
STREAMS = 3


Server = tuple[subprocess.Popen, str, Path]  # the launcher, its URL, its log


@pytest.fixture(scope="module")
def server(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("dashboard") / "duet.log"
    with server_process([str(tiny_checkpoint()), *ARGS], log) as (launcher, url):
        yield launcher, url, log


@pytest.fixture(scope="module")
def url(server: Server) -> str:
    return server[1]


class Load:
    """STREAMS clients streaming completions back to back until stopped."""

    def __init__(self, url: str) -> None:
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(STREAMS)]

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                stream = self.client.completions.create(
                    model="tiny", prompt=f"stream {i} turn {n}: " + "tell me more " * (4 + i),
                    max_tokens=48, temperature=0, stream=True, extra_body={"ignore_eos": True},
                )  # fmt: skip
                for _ in stream:
                    pass
            except Exception as exc:  # the test reports it
                self.errors.append(exc)
                return

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)
        assert not self.errors, self.errors


def get(url: str, key: str | None = KEY) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def stats(url: str) -> dict:
    status, _, body = get(f"{url}/dashboard/stats")
    assert status == 200, body
    return json.loads(body)


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as (sample name, sorted labels without model_name) -> value."""
    text = get(f"{url}/metrics")[2].decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(check: Callable[[], object], timeout: float = 120.0) -> object:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)
    return result


def test_page_is_open_and_stats_need_the_key(url: str) -> None:
    status, headers, body = get(f"{url}/dashboard", key=None)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b'<script src="/dashboard/dashboard.js"' in body
    for asset in ("dashboard.js", "dashboard.css"):
        assert get(f"{url}/dashboard/{asset}", key=None)[0] == 200
    for key in (None, "wrong"):
        status, _, body = get(f"{url}/dashboard/stats", key=key)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert stats(url)["model"] == "tiny"


def test_stats_and_pool_advice_under_load(url: str) -> None:
    with Load(url):
        # the first tokens streamed: a reading after that one sees them move
        wait_for(lambda: stats(url)["totals"]["generation_tokens"] > 0)
        # the advice comes with the core's snapshots (twice a second): one must have seen
        # the streams running too
        doc = wait_for(
            lambda: (
                (d := stats(url))["tokens_per_s"]["out"]
                and d["itl"]["p50"]
                and d["pool_advice"]["decode_demand"] > 0
                and d
            )
        )
        scraped = metrics(url)
    assert sorted(w["role"] for w in doc["workers"]) == ["decode", "prefill"]
    assert doc["ttft"]["p50"] > 0 and doc["itl"]["p99"] >= doc["itl"]["p50"]
    assert doc["spec_decode_acceptance"] is None  # spec decode is off
    assert doc["requests"]["swapped"] == 0
    assert len(doc["history"]["t"]) >= 1
    advice = doc["pool_advice"]
    assert 0.0 <= advice["prefill_fraction"] <= 1.0
    # NOTE: the tiny model prefills in a blink, so a sample rarely catches a prompt queued:
    # prefill demand may be 0, and decode (streams running) is what must show
    prefill, decode = advice["prefill_demand"], advice["decode_demand"]
    assert prefill >= 0 and decode > 0
    assert advice["prefill_fraction"] == pytest.approx(prefill / (prefill + decode))
    fraction = scraped[("duet:pd_recommended_prefill_fraction", ())]
    assert 0.0 <= fraction < 1.0  # decode had work
    assert scraped[("duet:num_workers", (("role", "prefill"),))] == 1
    assert scraped[("duet:num_workers", (("role", "decode"),))] == 1
    assert scraped[("duet:pd_pool_demand", (("role", "decode"),))] > 0


@pytest.fixture(scope="module")
def browser() -> str:
    binary, why = chromium()
    if binary is None and os.environ.get("CI"):  # CI is root with apt: a skip would hide it
        pytest.fail(f"no headless chromium in CI: {why}")
    if binary is None:
        pytest.skip(f"no headless chromium: {why}")
    return binary


def test_page_without_the_key_asks_for_it(url: str, browser: str, tmp_path: Path) -> None:
    html = dump_dom(browser, f"{url}/dashboard", tmp_path / "profile")
    page = PageValues(html)
    assert page.by_id["status"][0] == "API key needed"
    assert page.body["data-updates"] == "0"  # nothing shown without the key
    login = re.search(r"<form id=\"login\"[^>]*>", html)
    assert login is not None and "hidden" not in login.group(0)


def test_page_in_chromium_matches_metrics(url: str, browser: str, tmp_path: Path) -> None:
    page = f"{url}/dashboard?key={KEY}"
    with Load(url):
        wait_for(lambda: stats(url)["tokens_per_s"]["out"])  # readings with traffic in them
        before = metrics(url)
        live = PageValues(dump_dom(browser, page, tmp_path / "profile"))
        after = metrics(url)
        shot = tmp_path / "dashboard.png"
        screenshot(browser, page, shot, tmp_path / "profile")
    # live: the page updated from the server, and its counters lie between two scrapes
    assert int(live.body["data-updates"] or 0) >= 2, live.by_id
    assert live.by_id["status"][0] == "live"
    generated = ("duet:generation_tokens_total", ())
    shown = float(live.value("total-generation-tokens") or -1)
    assert before[generated] <= shown <= after[generated]
    assert float(live.value("tokens-out") or 0) > 0
    assert live.by_id["spec-decode"][0] == "off"
    assert 0.0 <= float(live.value("pd-fraction") or -1) <= 1.0
    assert sorted(w["role"] for w in live.workers.values()) == ["decode", "prefill"]
    spread, colours = pixel_spread(shot)
    assert spread > 0.05 and colours > 50, (spread, colours)
    # idle: every number the page shows equals what /metrics says
    wait_for(
        lambda: (
            stats(url)["requests"]["running"] == 0 and stats(url)["kv_transfers"]["in_flight"] == 0
        )
    )
    time.sleep(1.5)  # the next document: built after the last request was counted
    idle = PageValues(dump_dom(browser, page, tmp_path / "profile"))
    scraped = metrics(url)
    assert float(idle.value("running") or -1) == scraped[("duet:num_requests_running", ())]
    assert float(idle.value("waiting") or -1) == scraped[("duet:num_requests_waiting", ())]
    for name, element in [("generation_tokens", "total-generation-tokens"),
                          ("prompt_tokens", "total-prompt-tokens"),
                          ("kv_transfer_failures", "transfer-failures"),
                          ("recomputed_prefills", "recomputed-prefills")]:  # fmt: skip
        assert float(idle.value(element) or -1) == scraped[(f"duet:{name}_total", ())], element
    for worker_id, cells in idle.workers.items():
        usage = scraped[("duet:kv_cache_usage_perc", (("pool", worker_id),))]
        assert float(cells["kv.value"]) == pytest.approx(usage)
    assert float(idle.value("worker-deaths") or -1) == 0


def descendant_named(name: str, root: int) -> int:
    """The pid of the process called `name` (workers name themselves) under `root`."""
    parents = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)  # fmt: skip
        except OSError:
            continue
        parents[int(status.parent.name)] = (fields.get("Name", "").strip(), int(fields["PPid"]))
    for pid, (comm, _) in parents.items():
        ancestor = pid
        while ancestor in parents and ancestor != root:
            ancestor = parents[ancestor][1]
        if comm == name[:15] and ancestor == root:
            return pid
    raise LookupError(f"no process named {name} under {root}")


def test_a_dead_worker_shows_as_a_death_and_recomputes(
    server: Server, browser: str, tmp_path: Path
) -> None:
    launcher, url, log = server
    with Load(url):
        busy = wait_for(lambda: next((w for w in stats(url)["workers"]
                                      if w["role"] == "decode" and w["num_running"]), None))  # fmt: skip
        os.kill(descendant_named(busy["worker_id"], launcher.pid), signal.SIGKILL)
        # replaced (under a new id), and the load goes on through the new worker
        wait_for(lambda: any(w["role"] == "decode" and w["worker_id"] != busy["worker_id"]
                             for w in stats(url)["workers"]))  # fmt: skip
    time.sleep(1.5)  # the next document: built after the last request was counted
    doc = stats(url)
    # the core says how many requests the worker held when it died: each is recomputed
    found = re.search(
        rf"decode worker {busy['worker_id']} died with (\d+) requests", log.read_text()
    )
    assert found is not None
    assert doc["worker_deaths"] == 1
    assert doc["totals"]["recomputed_prefills"] == int(found.group(1))
    page = PageValues(dump_dom(browser, f"{url}/dashboard?key={KEY}", tmp_path / "profile"))
    assert page.value("worker-deaths") == "1"
    recomputed = metrics(url)[("duet:recomputed_prefills_total", ())]
    assert float(page.value("recomputed-prefills") or -1) == recomputed == int(found.group(1))


def test_colocated_server_shows_one_mixed_worker_and_no_advice(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    colocated = [a for a in ARGS if a not in ("--prefill-workers", "--decode-workers", "1")]
    with server_process([str(tiny_checkpoint()), *colocated], tmp_path / "duet.log") as (_, url):
        with Load(url):
            wait_for(lambda: stats(url)["totals"]["generation_tokens"] > 0)
        doc = wait_for(lambda: (d := stats(url))["workers"] and d)
        scraped = metrics(url)
    assert [(w["worker_id"], w["role"]) for w in doc["workers"]] == [("worker-0", "mixed")]
    assert doc["pool_advice"] is None and doc["kv_transfers"]["in_flight"] == 0
    assert scraped[("duet:num_workers", (("role", "mixed"),))] == 1
    assert not any(name == "duet:pd_recommended_prefill_fraction" for name, _ in scraped)
