"""The real ``tensorboard`` server lists our scalar tags and images over its HTTP API.

A small synthetic log dir following the tag contract of issue 5 (Megatron's tags plus the
``moe/``, ``ac/``, ``throughput/`` and ``memory/`` ones) is served by ``tensorboard`` on 127.0.0.1
on a free port; the test polls ``/data/plugin/scalars/tags`` (bounded wait) until the run and its
tags show up, fetches one series through ``/data/plugin/scalars/scalars`` and checks its values.
The server runs in its own process group and is stopped by its pid in the fixture finalizer, also
when the test fails.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")

STARTUP_TIMEOUT_S = 60
N_EXPERTS = 4
MOE_LAYERS = (1, 2)
STEPS = range(1, 6)
MEGATRON_TAGS = ["lm loss", "lm loss validation", "lm loss validation ppl", "learning-rate",
                 "grad-norm", "load_balancing_loss", "z_loss", "iteration-time", "throughput"]
GLOBAL_TAGS = ["throughput/tokens_per_s", "throughput/tokens_per_s_per_device", "memory/max_gib",
               "lm loss bits-per-token", "lm loss validation bits-per-token"]
MOE_STATS = ["load_max_over_mean", "load_cv", "router_entropy"]
AC_STATS = ["weight_mean", "weight_max", "clip_rate", "cluster_mad_mean", "separation_raw",
            "separation_ac"]


def expected_tags() -> set[str]:
    tags = set(MEGATRON_TAGS) | set(GLOBAL_TAGS)
    for k, layer in enumerate(MOE_LAYERS):
        tags |= {f"moe/layer{layer:02d}/load_fraction/expert{j:02d}" for j in range(N_EXPERTS)}
        tags |= {f"moe/layer{layer:02d}/{s}" for s in MOE_STATS}
        tags |= {f"ac/layer{layer:02d}/{s}" for s in AC_STATS}
        if k > 0:  # no instability for the first MoE layer
            tags.add(f"moe/layer{layer:02d}/instability")
    return tags


def loss_at(step: int) -> float:
    return 3.0 + 1.0 / step


def write_events(tb_dir: Path) -> None:
    """One event file in ``tb_dir`` with every expected tag; ``lm loss`` = loss_at(step)."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(tb_dir))
    for step in STEPS:
        for tag in sorted(expected_tags()):
            if tag == "lm loss":
                value = loss_at(step)
            elif "/load_fraction/" in tag:
                value = 1.0 / N_EXPERTS
            elif tag.endswith("/router_entropy"):
                value = math.log(N_EXPERTS)
            elif tag.endswith("/instability"):
                value = 0.25
            else:
                value = 1.0 + 0.1 * step
            w.add_scalar(tag, value, step)
    _write_images(w)
    w.close()


def _write_images(w) -> None:
    """The images our training writes (metrics.flush with images=True): the expert-load heatmap and
    the AC weight distribution, from real router metrics of MoE layers 1-2 (layer 2 an AC layer)."""
    import torch

    from acmoe_megatron.observability import metrics
    from acmoe_megatron.observability.writers import MetricWriter

    m = metrics.RouterMetrics(N_EXPERTS, list(MOE_LAYERS))
    logits = torch.randn(64, N_EXPERTS, generator=torch.Generator().manual_seed(0))
    rmap = torch.zeros_like(logits, dtype=torch.bool).scatter(1, logits.topk(2, -1).indices, True)
    for layer in MOE_LAYERS:
        m.record_routing(layer, logits, rmap, logits.argmax(-1), None, topk=2)
    counts = torch.tensor([20.0, 44.0, 0.0, 0.0])
    w_KD = torch.rand(N_EXPERTS, 8, generator=torch.Generator().manual_seed(1)) * 3
    m.record_ac(2, counts, torch.randn(N_EXPERTS, 8), torch.rand(N_EXPERTS, 8), w_KD, counts > 0, 1e-4, 10.0)
    metrics.flush([m], MetricWriter(w, None), STEPS[-1], images=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy


def get_json(base: str, path: str, **query):
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with _NO_PROXY.open(url, timeout=10) as resp:
        assert resp.status == 200, url
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def tb_server(tmp_path_factory):
    """(base URL, log dir) of a running tensorboard; stopped by pid whatever the test outcome."""
    logdir = tmp_path_factory.mktemp("tb_logdir")
    write_events(logdir)
    port = _free_port()
    log = (logdir.parent / "tensorboard_server.log").open("w+")
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
           "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", logdir, proc, log
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (its own session: pgid == pid), SIGKILL after 10 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _server_log(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


def wait_for_tags(base: str, proc, log, want: set[str]) -> dict:
    """Poll ``/data/plugin/scalars/tags`` until a run lists every tag in ``want`` (≤ 60 s)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tensorboard exited with {proc.returncode}:\n{_server_log(log)}")
        try:
            last = get_json(base, "/data/plugin/scalars/tags")
            if any(want <= set(tags) for tags in last.values()):
                return last
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass  # not listening / not loaded yet
        time.sleep(0.5)
    pytest.fail(f"tensorboard did not list the tags within {STARTUP_TIMEOUT_S} s; last answer "
                f"{last!r}\nserver log:\n{_server_log(log)}")


def test_tensorboard_server_lists_our_scalar_tags(tb_server):
    base, _logdir, proc, log = tb_server
    want = expected_tags()
    tags = wait_for_tags(base, proc, log, want)
    assert list(tags) == ["."], f"expected the log dir root as the only run, got {list(tags)}"
    listed = set(tags["."])
    missing = want - listed
    assert not missing, f"tags not listed by tensorboard: {sorted(missing)}"
    assert "moe/layer01/instability" not in listed  # first MoE layer has none
    assert {t for t in listed if t.startswith("moe/layer02/load_fraction/")} == {
        f"moe/layer02/load_fraction/expert{j:02d}" for j in range(N_EXPERTS)
    }

    # one series through the HTTP API: rows are [wall_time, step, value]
    rows = get_json(base, "/data/plugin/scalars/scalars", run=".", tag="lm loss")
    assert [r[1] for r in rows] == list(STEPS)
    for _wall, step, value in rows:
        assert value == pytest.approx(loss_at(step), rel=1e-6)
    fractions = [get_json(base, "/data/plugin/scalars/scalars", run=".",
                          tag=f"moe/layer02/load_fraction/expert{j:02d}")[-1][2]
                 for j in range(N_EXPERTS)]
    assert sum(fractions) == pytest.approx(1.0, rel=1e-6)

    # the images page: both images listed, and the heatmap served as a PNG
    images = get_json(base, "/data/plugin/images/tags")["."]
    assert {"images/expert_load", "images/ac_weights"} <= set(images), images
    entries = get_json(base, "/data/plugin/images/images", run=".", tag="images/expert_load")
    assert entries and entries[-1]["step"] == STEPS[-1], entries
    url = f"{base}/data/plugin/images/individualImage?{entries[-1]['query']}"
    with _NO_PROXY.open(url, timeout=10) as resp:
        png = resp.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
