"""preflight/report.py: rank files -> one line per item, the verdict, the table."""

from acmoe_megatron.runtime.preflight.report import merge, table

PLAN = {"config": "c.yaml", "recipe_hash": "h", "world_size": 2, "steps": 4, "memory": None,
        "layout": {"tp": 1, "pp": 1, "cp": 1, "ep": 2, "etp": 1, "dp": 2}}


def _rank(r, node, *items, finished=True, running=None):
    data = {"rank": r, "node": node, "running": running, "items": [
        {"item": i, "status": s, "detail": d, "fix": f"fix {i}"} for i, s, d in items]}
    if finished:
        data["finished"] = 1.0
    return data


def _ok(r, node):
    return _rank(r, node, ("environment", "info", "torch x"), ("storage", "pass", "ok"), ("training", "pass", "4 steps"),
                 ("fp8 gemm", "skipped", "no GPU"), ("checkpoint", "pass", "identical"))


def test_all_pass_with_skips():
    report = merge(PLAN, {0: _ok(0, "n1"), 1: _ok(1, "n2")})
    assert report["verdict"] == "pass"
    lines = {(x["item"], x["where"]): x["status"] for x in report["items"]}
    assert lines[("environment", "node n1 (ranks 0)")] == "info" and ("environment", "node n2 (ranks 1)") in lines
    assert lines[("fp8 gemm", "all 2 ranks")] == "skipped"
    assert "verdict: PASS (skipped: fp8 gemm)" in table(report)


def test_one_rank_failing_names_rank_node_and_fix():
    bad = _rank(1, "n2", ("storage", "fail", "Read-only file system"), ("training", "pass", "4 steps"))
    report = merge(PLAN, {0: _ok(0, "n1"), 1: bad})
    assert report["verdict"] == "fail"
    line = next(x for x in report["items"] if x["item"] == "storage")
    assert line["status"] == "fail" and line["where"] == "rank 1 (n2)" and line["fix"] == "fix storage"
    assert "verdict: FAIL (1 item(s)): storage on rank 1 (n2): Read-only file system; fix: fix storage" in table(report)


def test_missing_and_unfinished_ranks_fail():
    stuck = _rank(1, "n2", ("storage", "pass", "ok"), finished=False, running="collectives")
    report = merge(PLAN, {0: _ok(0, "n1"), 1: stuck})
    line = next(x for x in report["items"] if x["item"] == "collectives")
    assert report["verdict"] == "fail" and line["where"] == "rank 1 (n2)" and "stopped inside 'collectives'" in line["detail"]
    report = merge(PLAN, {0: _ok(0, "n1"), 1: None})
    assert report["verdict"] == "fail" and any("never started" in x["detail"] for x in report["items"])


def test_collectives_slowest_member_and_group():
    def timed(r, node, ranks, seconds, bw):
        data = _ok(r, node)
        data["items"].append({"item": "collectives", "status": "pass", "detail": "", "timings": [
            {"collective": "expert all-to-all", "ranks": ranks, "seconds": seconds, "busbw_gbps": bw}]})
        return data

    ranks = {0: timed(0, "n1", [0, 1], 1.0, 5.0), 1: timed(1, "n2", [0, 1], 2.0, 2.5),
             2: timed(2, "n1", [2, 3], 1.0, 9.0), 3: timed(3, "n1", [2, 3], 1.0, 9.0)}
    report = merge(dict(PLAN, world_size=4), ranks)
    groups = {tuple(c["ranks"]): c for c in report["collectives"]}
    assert groups[(0, 1)]["seconds"] == 2.0 and groups[(0, 1)]["nodes"] == ["n1", "n2"]
    assert groups[(0, 1)].get("slowest") and not groups[(2, 3)].get("slowest")
    line = next(x for x in report["items"] if x["item"] == "collectives")
    assert "ranks [0, 1] (n1+n2): 2.50 GB/s <- slowest" in line["detail"]
