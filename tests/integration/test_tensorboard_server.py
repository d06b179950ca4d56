"""The real ``tensorboard`` server lists our scalar tags over its HTTP API.

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
    w.close()


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
