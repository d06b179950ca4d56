"""The preflight's verdict: the workers' ``rank_<r>.json`` merged into ``preflight.json`` and one
table (pure: no torch, so the login node that submitted the job prints it).

One line per item. An item fails when it failed on any process; the line names every failing
process (rank and node), the first failure's cause and its fix. A process with no report, or one
that stopped inside an item (killed at the time limit, hung in a collective, crashed), is a failed
line naming the item it was in. ``environment`` is one line per node. The collectives are merged
per process group (the slowest member's time), with the nodes each group spans, so a slow link
shows as the group with the lowest bandwidth. The verdict passes only when every process finished
and no item failed; skipped items say why.
"""

from __future__ import annotations

import json
from pathlib import Path

from acmoe_megatron.runtime.preflight.memory import size

REPORT_FILE = "preflight.json"
ITEMS = ("environment", "fused paths", "fp8 gemm", "memory", "storage", "training", "pipeline labels",
         "collectives", "checkpoint", "tensorboard")


def read_ranks(out: Path, world_size: int) -> dict[int, dict | None]:
    ranks = {}
    for r in range(world_size):
        path = out / f"rank_{r}.json"
        try:
            ranks[r] = json.loads(path.read_text())
        except (OSError, ValueError):
            ranks[r] = None
    return ranks


def _where(entries: list[tuple[int, str]], world: int) -> str:
    if len(entries) == world and world > 1:
        return f"all {world} ranks"
    return ", ".join(f"rank {r} ({node})" for r, node in entries[:4]) + (
        f" +{len(entries) - 4} more" if len(entries) > 4 else "")


def merge(plan: dict, ranks: dict[int, dict | None], launcher_items: list[dict] = (), log: str | None = None) -> dict:
    """preflight.json's content: plan facts, one merged line per item, collectives, the verdict."""
    world = plan["world_size"]
    lines = [dict(x) for x in launcher_items]
    by_item: dict[str, list[tuple[int, str, dict]]] = {}
    nodes: dict[str, list[int]] = {}
    for r, data in ranks.items():
        if data is None:
            continue
        nodes.setdefault(data["node"], []).append(r)
        for it in data["items"]:
            by_item.setdefault(it["item"], []).append((r, data["node"], it))
    unfinished: dict[str, list[tuple[int, str]]] = {}
    for r, data in ranks.items():
        if data is None:
            unfinished.setdefault("(no report)", []).append((r, "?"))
        elif not data.get("finished"):
            unfinished.setdefault(data.get("running") or "between items", []).append((r, data["node"]))
    stopped = []
    see = "see the job log" + (f" ({log})" if log else "")
    for doing, entries in unfinished.items():
        if doing == "(no report)":
            stopped.append({"item": "process", "status": "fail", "where": _where(entries, world),
                            "detail": "no report: the process never started the preflight",
                            "fix": see + " for this rank's error", "ranks": [r for r, _ in entries]})
        else:
            stopped.append({"item": doing if doing in ITEMS else "process", "status": "fail",
                            "where": _where(entries, world),
                            "detail": f"stopped inside '{doing}' without a result (crashed, killed, or hung)",
                            "fix": see + "; a hang in a collective points at that process group's network",
                            "ranks": [r for r, _ in entries]})
    env_lines = []
    for node, rs in sorted(nodes.items()):
        r = min(rs)
        env = next((it for rr, _, it in by_item.get("environment", []) if rr == r), None)
        if env:
            env_lines.append({"item": "environment", "status": "info", "where": f"node {node} (ranks "
                              f"{','.join(map(str, sorted(rs)))})", "detail": env["detail"],
                              "facts": {k: v for k, v in env.items() if k not in ("item", "status", "detail", "fix")}})
    lines += env_lines
    for item in ITEMS[1:]:
        entries = by_item.get(item, [])
        if not entries:
            continue
        failed = [(r, n, it) for r, n, it in entries if it["status"] == "fail"]
        passed = [(r, n, it) for r, n, it in entries if it["status"] == "pass"]
        if failed:
            it = failed[0][2]
            lines.append({"item": item, "status": "fail", "where": _where([(r, n) for r, n, _ in failed], world),
                          "detail": it["detail"], "fix": it.get("fix", ""), "ranks": [r for r, _, _ in failed]})
        elif passed:
            pick = [e for e in passed if e[2].get("crossings")] or passed  # pipeline labels: a stage that received
            it = (pick[-1] if item in ("tensorboard", "pipeline labels") else pick[0])[2]
            extra = {k: v for k, v in it.items() if k in ("losses", "step_time_s", "relative_error", "wall_s")}
            lines.append({"item": item, "status": "pass", "where": _where([(r, n) for r, n, _ in passed], world),
                          "detail": it["detail"], **extra})
        else:
            it = entries[0][2]
            lines.append({"item": item, "status": "skipped", "where": _where([(r, n) for r, n, _ in entries], world),
                          "detail": it["detail"]})
    lines += stopped
    collectives = merge_collectives(ranks)
    if collectives:
        for line in lines:
            if line["item"] == "collectives" and line["status"] == "pass":
                line["detail"] = "; ".join(
                    f"{c['collective']} ranks {c['ranks']} ({'+'.join(c['nodes'])}): {c['busbw_gbps']:.2f} GB/s"
                    + (" <- slowest" if c.get("slowest") else "") for c in collectives)
    failed = [x for x in lines if x["status"] == "fail"]
    return {"verdict": "fail" if failed else "pass", "config": plan["config"], "recipe_hash": plan["recipe_hash"],
            "world_size": world, "layout": plan["layout"], "nodes": {k: sorted(v) for k, v in nodes.items()},
            "memory": plan.get("memory"), "steps": plan["steps"], "items": lines, "collectives": collectives}


def merge_collectives(ranks: dict[int, dict | None]) -> list[dict]:
    """One entry per (collective, group): the slowest member's time; the nodes the group spans;
    the slowest group of each kind marked when a kind has several groups."""
    node_of = {r: d["node"] for r, d in ranks.items() if d}
    groups: dict[tuple, dict] = {}
    for data in ranks.values():
        if not data:
            continue
        for it in data["items"]:
            for t in it.get("timings", []):
                key = (t["collective"], tuple(t["ranks"]))
                if key not in groups or t["seconds"] > groups[key]["seconds"]:
                    groups[key] = dict(t, nodes=sorted({node_of.get(r, "?") for r in t["ranks"]}))
    out = sorted(groups.values(), key=lambda c: (c["collective"], c["ranks"]))
    for kind in {c["collective"] for c in out}:
        same = [c for c in out if c["collective"] == kind]
        if len(same) > 1:
            min(same, key=lambda c: c["busbw_gbps"])["slowest"] = True
    return out


def write_report(out: Path, report: dict) -> Path:
    path = out / REPORT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)
    return path


def table(report: dict) -> str:
    """The report as text: a header, one row per item, the memory estimate, the verdict."""
    lay = report["layout"]
    head = (f"acmoe-preflight: {report['config']} (recipe {report['recipe_hash']}), world size {report['world_size']}"
            f" on {len(report['nodes']) or '?'} node(s): "
            + ", ".join(f"{k} {lay[k]}" for k in ("tp", "pp", "cp", "ep", "etp", "dp") if k in lay))
    rows = [("item", "status", "where", "detail")]
    for x in report["items"]:
        detail = x["detail"] + (f"  [fix: {x['fix']}]" if x["status"] == "fail" and x.get("fix") else "")
        rows.append((x["item"], x["status"].upper() if x["status"] == "fail" else x["status"], x["where"], detail))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = min(30, max(len(r[2]) for r in rows))
    text = [head] + [f"  {a:<{w0}}  {b:<{w1}}  {c:<{w2}}  {d}" for a, b, c, d in rows]
    mem = report.get("memory")
    if mem:
        text.append(f"  memory of the full recipe per GPU ({mem['stage']}, {mem['precision']}, megatron's estimate): "
                    f"parameters {size(mem['parameters_bytes'])}, gradients {size(mem['gradients_bytes'])}, "
                    f"optimizer {size(mem['optimizer_bytes'])}, activations {size(mem['activations_bytes'])} "
                    f"({mem['micro_batches']} micro-batches), total {size(mem['total_bytes'])}")
    failed = [x for x in report["items"] if x["status"] == "fail"]
    if failed:
        x = failed[0]
        text.append(f"verdict: FAIL ({len(failed)} item(s)): {x['item']} on {x['where']}: {x['detail']}"
                    + (f"; fix: {x['fix']}" if x.get("fix") else ""))
    else:
        skipped = [x["item"] for x in report["items"] if x["status"] == "skipped"]
        text.append("verdict: PASS" + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
    return "\n".join(text)
