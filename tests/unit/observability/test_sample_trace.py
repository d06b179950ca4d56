"""sample_trace: per-rank records merge back into each step's global sample order, independent of
the number of data-parallel replicas; a step run again after a crash keeps its last record."""

import pytest

from acmoe_megatron.observability.sample_trace import SampleTrace, read_trace


def _record(run_dir, dp_size, steps, micro_batches, b=2, first_step=1, rank_offset=0):
    """Write what ``dp_size`` replicas record for ``steps`` steps of ``micro_batches`` micro-batches
    each, where step s's global stream is s*100 + 0, 1, 2, ... dealt as the loader deals it."""
    traces = [SampleTrace(run_dir, rank_offset + r, r, dp_size) for r in range(dp_size)]
    for step in range(first_step, first_step + steps):
        for k in range(micro_batches):
            for r, trace in enumerate(traces):
                first = (k * dp_size + r) * b  # the loader's position of replica r's k-th micro-batch
                trace.record(step, [step * 100 + first + i for i in range(b)])


def test_the_merged_order_does_not_depend_on_the_number_of_replicas(tmp_path):
    _record(tmp_path / "dp1", 1, steps=3, micro_batches=4)
    _record(tmp_path / "dp2", 2, steps=3, micro_batches=2)
    _record(tmp_path / "dp4", 4, steps=3, micro_batches=1)
    one = read_trace(tmp_path / "dp1")
    assert one == {s: [s * 100 + i for i in range(8)] for s in (1, 2, 3)}
    assert read_trace(tmp_path / "dp2") == one == read_trace(tmp_path / "dp4")


def test_a_step_run_again_keeps_its_last_record(tmp_path):
    _record(tmp_path, 2, steps=2, micro_batches=1)  # steps 1, 2
    SampleTrace(tmp_path, 1, 1, 2).record(3, [7, 7])  # step 3 half-done on rank 1, then a crash
    _record(tmp_path, 1, steps=2, micro_batches=2, first_step=3, rank_offset=0)  # resumed on 1 process
    got = read_trace(tmp_path)
    assert got[3] == [300, 301, 302, 303] and got[4] == [400, 401, 402, 403]


def test_no_trace_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.trace_samples=true"):
        read_trace(tmp_path)
