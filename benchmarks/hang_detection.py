"""How long a hung rank takes to end a run (runtime/heartbeat.py + runtime/hang_watch.py).

Each trial trains the tiny CPU recipe on 2 processes (EP 2, gloo) through ``acmoe-pretrain`` with a
checkpoint at step 3; rank 1 stops itself with SIGSTOP when it enters ``--phase`` of step 5
(``ACMOE_FAULT_STOP_AT_ITER``). Measured: from the fault's own timestamp (printed just before the
SIGSTOP) to the launcher's exit, and the exit code, for ``run.hang_timeout_s`` = each ``--bounds``.
Without the watch the run waits for megatron's collective timeout (``distributed_timeout_minutes``,
10 minutes by default).

    python benchmarks/hang_detection.py                  # writes benchmarks/results/hang_detection.md
    python benchmarks/hang_detection.py --bounds 10,20 --trials 3 --out -
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["megatron.seq_length=64", "megatron.max_position_embeddings=64", "megatron.micro_batch_size=4",
             "megatron.global_batch_size=8", "megatron.lr_warmup_iters=1", "megatron.eval_iters=0",
             "megatron.eval_interval=1000", "megatron.log_interval=1", "megatron.train_iters=8",
             "megatron.save_interval=3"]


def trial(data: Path, run_dir: Path, bound: float, phase: str) -> tuple[int, float | None, str]:
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", "configs/tiny_cpu.yaml", "--nproc", "2",
           *OVERRIDES, f"data.path={data}", f"run.dir={run_dir}", f"run.hang_timeout_s={bound:g}",
           f"run.hang_timeout_checkpoint_s={max(60.0, bound):g}"]
    env = {**os.environ, "ACMOE_FAULT_STOP_AT_ITER": "5", "ACMOE_FAULT_STOP_RANK": "1", "ACMOE_FAULT_STOP_PHASE": phase}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    ended = time.time()
    log = out.stdout + out.stderr
    m = re.search(r"stops itself \(SIGSTOP\) in \S+ of iteration \d+ at ([0-9.]+)", log)
    cause = next((line for line in log.splitlines() if line.startswith("acmoe-pretrain: rank")), log[-500:])
    return out.returncode, (ended - float(m.group(1))) if m else None, cause


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bounds", default="10,30", help="run.hang_timeout_s values, comma separated (default 10,30)")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--phase", default="backward", help="the phase rank 1 stops in (default backward)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hang_detection.md"), help="'-': print only")
    args = p.parse_args(argv)
    from acmoe_megatron.data import prepare

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(source="stdlib", out_dir=data, seq_length=64, max_bytes=200_000)
        for bound in (float(b) for b in args.bounds.split(",")):
            for k in range(args.trials):
                rc, seconds, cause = trial(data, Path(tmp) / f"run_{bound:g}_{k}", bound, args.phase)
                print(f"bound {bound:g} s, trial {k + 1}: exit {rc}, {seconds and round(seconds, 2)} s: {cause}",
                      flush=True)
                rows.append((bound, rc, seconds, cause))
    lines = [
        "# Hang detection time",
        "",
        f"- command: `{shlex.join(['python', 'benchmarks/hang_detection.py', *(argv or sys.argv[1:])])}`",
        f"- machine: {platform.node()}, {os.cpu_count()} CPU cores, {platform.platform()}, Python "
        f"{platform.python_version()}",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- what: 2 processes (tiny CPU recipe, EP 2, gloo); rank 1 SIGSTOPs itself in {args.phase} of step 5; time "
        "from that moment to the exit of `acmoe-pretrain`. Detection = the bound after the last phase change of any "
        "rank, plus at most one poll (bound / 10, between 0.5 and 10 s), plus the SIGKILL and torchrun's exit.",
        "",
        "| run.hang_timeout_s | trials | exit codes | SIGSTOP → launcher exit (s), mean [min, max] | cause named |",
        "|---|---|---|---|---|",
    ]
    for bound in dict.fromkeys(b for b, *_ in rows):
        mine = [r for r in rows if r[0] == bound]
        secs = [s for _, _, s, _ in mine if s is not None]
        span = f"{statistics.fmean(secs):.1f} [{min(secs):.1f}, {max(secs):.1f}]" if secs else "—"
        lines.append(f"| {bound:g} | {len(mine)} | {', '.join(str(r[1]) for r in mine)} | {span} | "
                     f"`{mine[-1][3].removeprefix('acmoe-pretrain: ')[:160]}` |")
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
