"""PlanWorker: jobs run off the caller's thread, the newest waiting job replaces an older one."""

import threading

from gateway.plan_worker import PlanWorker


def test_a_newer_job_replaces_one_still_waiting_and_submit_never_blocks():
    worker = PlanWorker()
    release, started, ran = threading.Event(), threading.Event(), []

    def slow():
        started.set()
        release.wait(10)
        ran.append("slow")

    try:
        worker.submit(slow)
        assert started.wait(10)
        worker.submit(lambda: ran.append("old"))  # waits behind the running job...
        worker.submit(lambda: ran.append("new"))  # ...and is replaced by this one
        assert worker.superseded == 1
        release.set()
        assert worker.wait_idle(10)
        assert ran == ["slow", "new"]
    finally:
        worker.close()


def test_a_failing_job_does_not_stop_the_worker():
    worker = PlanWorker()
    ran = []
    try:
        worker.submit(lambda: 1 / 0)
        assert worker.wait_idle(10)
        worker.submit(lambda: ran.append(threading.current_thread().name))
        assert worker.wait_idle(10)
        assert ran == ["replica-planner"]
    finally:
        worker.close()
