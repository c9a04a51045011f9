"""The tenant-spend reporter survives kopf's shutdown. On SIGTERM kopf cancels every task of the loop that was born
after it started and is still running 5 s into its stop ("hung" tasks: kopf._core.reactor.running.run_tasks). The
reporter's own task is older than that, but a wait that ran stop.wait() as a task of its own (asyncio.wait_for) gave
kopf one to cancel: the reporter then ended cancelled, and the operator exited with a CancelledError, not 0 (seen
on the real control plane by tests/cluster/test_operator_tenants.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from tiergate_operator.tenant_spend import SpendReporter


def test_reporter_waiting_for_its_next_pass_is_not_cancelled_by_kopfs_shutdown() -> None:
    async def scenario() -> tuple[list[str], bool, BaseException | None]:
        stop = asyncio.Event()
        policies: list[dict[str, Any]] = []
        reporter = SpendReporter(None, lambda: policies, interval_s=3600)  # type: ignore[arg-type]
        task = asyncio.create_task(reporter.run(stop), name="tenant-spend")
        before = asyncio.all_tasks()  # what kopf ignores: the tasks that existed when it started
        await asyncio.sleep(0.05)  # the reporter is now waiting for its next pass
        hung = [t for t in asyncio.all_tasks() if t not in before]
        for t in hung:
            t.cancel()
        await asyncio.sleep(0.05)
        stop.set()  # then the operator's own shutdown
        await asyncio.gather(task, return_exceptions=True)
        return [t.get_name() for t in hung], task.cancelled(), None if task.cancelled() else task.exception()

    hung, cancelled, exc = asyncio.run(scenario())
    assert hung == [], f"the reporter's wait left tasks for kopf to cancel: {hung}"
    assert not cancelled
    assert exc is None
