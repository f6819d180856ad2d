"""The harness of the multi-process tests: spawn a gloo group once, let every rank run every
scenario and write what happened to a JSON file, then check each scenario from the parent."""

import json
import os
import time
import traceback
import warnings
from datetime import timedelta

import pytest
import torch


def spawn_rank_reports(run_rank, world, tmp, timeout_s):
    """Run ``run_rank(rank, world, store_path, report_dir)`` in ``world`` spawned processes and
    return their reports, one dict {scenario: 'ok' | traceback} per rank."""
    context = torch.multiprocessing.start_processes(
        run_rank, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=False,
        start_method="spawn")
    deadline = time.monotonic() + timeout_s
    crash = None
    while True:
        try:
            if context.join(timeout=5):
                break
        except torch.multiprocessing.ProcessExitedException as exited:
            crash = exited
            break
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} spawned ranks did not finish in {timeout_s} s")
    reports = []
    for rank in range(world):
        try:
            with open(tmp / f"rank{rank}.json") as handle:
                reports.append(json.load(handle))
        except (OSError, ValueError):
            if crash is not None:  # the rank died before its report was complete
                raise crash
            raise
    if crash is not None:
        # Every rank wrote its report, which is done before the process group is destroyed: the
        # crash came after the scenarios, in torch.distributed's teardown (seen once in many
        # runs: gloo's "terminate called without an active exception"). The scenarios are judged
        # by their reports; a scenario that did not run still fails as "not run".
        warnings.warn(f"a spawned rank exited abnormally after writing its report: {crash}")
    return reports


def assert_scenario_ok(reports, scenario):
    failures = {rank: report.get(scenario, "not run") for rank, report in enumerate(reports)}
    failures = {rank: text for rank, text in failures.items() if text != "ok"}
    assert not failures, "\n".join(f"--- rank {r}:\n{t}" for r, t in failures.items())


def run_scenarios(rank, world, store_path, report_dir, scenarios):
    """The body of a spawned rank: join the gloo group, run every scenario (a function of
    (rank, world)), record 'ok' or the traceback per scenario, and write the report."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # W processes share a small machine
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    report = {}
    try:
        for name, scenario in scenarios.items():
            try:
                scenario(rank, world)
                report[name] = "ok"
            except Exception:  # recorded per scenario; the test of that scenario fails
                report[name] = traceback.format_exc()
    finally:
        with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(report, handle)
        dist.destroy_process_group()
