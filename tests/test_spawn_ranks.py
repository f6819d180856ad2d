"""The multi-process harness itself: a rank that crashes after writing its report (a teardown
crash) leaves the scenarios to their reports; one that crashes before fails the fixture."""

import json
import os
import time
import warnings

import pytest
import torch

from spawn_ranks import spawn_rank_reports


def _abort_after_report(rank, world, store_path, report_dir):
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"scenario": "ok"}, handle)
    if rank == 0:  # once the other rank's report is there too (a crash ends the other ranks)
        other = os.path.join(report_dir, "rank1.json")
        deadline = time.monotonic() + 50
        while not os.path.exists(other) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # its write finished
        os.abort()


def _abort_before_report(rank, world, store_path, report_dir):
    if rank == 0:
        os.abort()
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"scenario": "ok"}, handle)


def test_crash_after_the_report_leaves_the_reports(tmp_path):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        reports = spawn_rank_reports(_abort_after_report, 2, tmp_path, 60)
    assert reports == [{"scenario": "ok"}, {"scenario": "ok"}]
    assert any("exited abnormally after writing its report" in str(w.message) for w in seen)


def test_crash_before_the_report_fails(tmp_path):
    with pytest.raises(torch.multiprocessing.ProcessExitedException):
        spawn_rank_reports(_abort_before_report, 2, tmp_path, 60)
