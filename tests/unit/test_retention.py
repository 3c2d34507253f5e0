import asyncio

from mailslot.services.retention import RetentionJob


async def test_run_once_reports_each_purge_and_survives_a_failing_one() -> None:
    seen: list[int] = []

    async def sessions(now: int) -> int:
        seen.append(now)
        return 3

    async def broken(now: int) -> int:
        raise RuntimeError("database down")

    job = RetentionJob()
    job.purges = {"broken": broken, "sessions": sessions}
    assert await job.run_once() == {"sessions": 3}
    assert len(seen) == 1 and seen[0] > 1_700_000_000


async def test_start_runs_in_background_and_stop_ends_it() -> None:
    calls = 0

    async def purge(now: int) -> int:
        nonlocal calls
        calls += 1
        return 0

    job = RetentionJob(interval_seconds=0.01)
    job.purges["x"] = purge
    job.start()
    await asyncio.sleep(0.1)
    await job.stop()
    after_stop = calls
    await asyncio.sleep(0.05)
    assert after_stop >= 2 and calls == after_stop
