"""Data at scale: a 2 GiB token corpus read with DP=2 in the memory of the embedded one, and trained on.

A synthetic corpus of 1 G byte tokens (``--source synthetic:1G``: 2 GiB of uint16 token shards,
~262 k samples of 4097 tokens in 64 shards) is written once. Each of two data-parallel ranks
(separate processes, like training ranks) reads 300 micro-batches from it and from the embedded
stdlib corpus prepared at the same sequence length; its peak RSS on the big corpus must exceed the
one on the embedded corpus by less than 100 MiB (the old reader held the split in memory: +2 GiB
per rank). The same processes check that a reader restarted at Megatron's consumed-samples count
after 200 micro-batches yields exactly the batches of the uninterrupted one. Then ``acmoe-pretrain``
trains 3 steps (DP=2) on the big corpus. About two minutes on 2 CPU cores, most of it writing the
corpus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from acmoe_megatron.data import prepare

ROOT = Path(__file__).resolve().parents[2]
SEQ = 4096
WORKER = ROOT / "tests" / "integration" / "dist" / "data_rss.py"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    big = prepare("synthetic:1G", root / "big", SEQ, 4096, splits=["train", "valid"])
    prepare("stdlib", root / "small", SEQ, 4096, splits=["train", "valid"])
    shard_bytes = sum(s.bytes for s in big.splits["train"].shards)
    assert shard_bytes >= 2 * 2**30, shard_bytes  # >= 2 GiB of token shards
    return root


def _ranks(shard_dir: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--dir", str(shard_dir), "--rank", str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for r in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_ranks_read_a_2gib_corpus_in_the_memory_of_the_embedded_one_and_resume_exactly(corpora):
    small, big = _ranks(corpora / "small"), _ranks(corpora / "big")
    assert big[0]["samples"] > 250_000 and big[0]["two_level"]  # shard permutation + windows
    for rank in range(2):
        extra_mib = (big[rank]["peak_rss_kib"] - small[rank]["peak_rss_kib"]) / 1024
        print(f"rank {rank}: peak RSS {big[rank]['peak_rss_kib'] / 1024:.0f} MiB on 2 GiB of shards, "
              f"{small[rank]['peak_rss_kib'] / 1024:.0f} MiB on the embedded corpus (+{extra_mib:.1f} MiB)")
        assert extra_mib < 100
        for run in (small[rank], big[rank]):
            assert run["resumed"] == run["uninterrupted"]
    ids = [i for rank in big for batch in rank["ids"] for i in batch]
    assert len(ids) == len(set(ids))  # the two ranks read disjoint samples


def test_training_runs_from_the_2gib_corpus(corpora, tmp_path):
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", "configs/tiny_cpu.yaml", "--nproc", "2",
           f"data.path={corpora / 'big'}", f"run.dir={tmp_path / 'run'}", "data.shuffle_window=65536",
           f"megatron.seq_length={SEQ}", f"megatron.max_position_embeddings={SEQ}",
           "megatron.micro_batch_size=1", "megatron.global_batch_size=2", "megatron.train_iters=3",
           "megatron.lr_warmup_iters=1", "megatron.eval_iters=0", "megatron.log_interval=1",
           "megatron.save_interval=1000", "megatron.num_layers=2", "megatron.hidden_size=32",
           "megatron.ffn_hidden_size=64", "megatron.moe_ffn_hidden_size=64", "acmoe.first_ac_layer=2"]
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 3, summary
