"""Issue 22: a cancel first asks the running job to stop, so its worker and loaded model serve the next job; a
job that does not stop within `cancel_grace_seconds` has its worker ended. Pools of 1 and 2, both backends."""
import asyncio, time

import pytest

from helpers import make as make_manager, run, until

pytestmark = pytest.mark.timeout(120)
POOLS = pytest.mark.parametrize('n', [1, 2], ids=['pool1', 'pool2'])

class Events:
    "A broadcaster that records (kind, data)."
    def __init__(self): self.events = []
    async def broadcast(self, event, data): self.events.append((event.split(':', 1)[1], data))
    def of(self, job_id, kind): return [d for k, d in self.events if k == kind and d.get('job_id') == job_id]

def make(n, backend='process', **cfg): return make_manager(n, events=Events(), worker_type='cx',
                                                           backend=backend, **cfg)

async def how(events, job):
    "The `how` of the job's cancelled event, once delivered."
    await until(f"the cancelled event of {job.id}", lambda: events.of(job.id, 'cancelled'), 5)
    return [d.get('how') for d in events.of(job.id, 'cancelled')]

async def history(m, pid):
    "The plugin manager's own record (loads, closes, stops) of the only worker, `pid`."
    job = await m.wait_for_job((await m.start_job('history')).id, timeout=20)
    assert job.worker_pid == pid
    return job.result['events']

@POOLS
def test_a_streaming_job_stops_between_chunks_and_its_worker_keeps_the_model(no_leftover_processes, backend,
                                                                             n):
    async def main():
        m, events = make(n, backend)
        try:
            await m.start()
            job = await m.start_job('stream', text=' '.join(f'w{i}' for i in range(200)), delay=0.05,
                                    stream=True)
            await until("the third chunk", lambda: len(m.get_job_chunks(job.id)) >= 3)
            pid = job.worker_pid
            t0 = time.monotonic()
            assert await m.cancel_job(job.id)
            took = time.monotonic() - t0
            assert job.status == 'cancelled' and job.error is None
            assert await how(events, job) == ['stopped']
            nxt = await m.wait_for_job((await m.start_job('stream', text='next one', stream=True)).id, 20)
            assert nxt.status == 'completed'
            assert pid in [r['pid'] for r in m.get_workers_info()], "its worker was replaced"
            if n == 1:  # the same process ran the next job, and loaded the plugin once
                assert nxt.worker_pid == pid
                record = await history(m, pid)
                assert record.count('load stream') == 1 and 'stream closed' in record, record
            assert (not events.of(None, 'worker_died')
                    and all(r['restart_count'] == 0 for r in m.get_workers_info()))
            print(f"cancel answered in {took * 1000:.1f} ms")
        finally: m.shutdown()
    run(main())

@POOLS
def test_a_job_stops_at_report_progress_or_check_cancelled(no_leftover_processes, n):
    async def main():
        m, events = make(n)
        try:
            await m.start()
            for plugin in ('progress', 'cancellable'):
                job = await m.start_job(plugin, seconds=60, steps=6000)
                await until(f"{plugin} runs", lambda: job.status == 'running')
                pid = job.worker_pid
                await asyncio.sleep(0.1)
                assert await m.cancel_job(job.id)
                assert job.status == 'cancelled' and await how(events, job) == ['stopped']
                assert pid in [r['pid'] for r in m.get_workers_info()], "its worker was replaced"
            if n == 1: assert 'cancellable stopped' in await history(m, pid)
        finally: m.shutdown()
    run(main())

@POOLS
def test_a_job_that_never_checks_is_killed_after_the_grace(no_leftover_processes, n):
    async def main():
        m, events = make(n, cancel_grace_seconds=0.5)
        try:
            await m.start()
            job = await m.start_job('hang')
            await until("the job runs", lambda: job.status == 'running')
            pid = job.worker_pid
            t0 = time.monotonic()
            assert await m.cancel_job(job.id)
            waited = time.monotonic() - t0
            assert job.status == 'cancelled' and await how(events, job) == ['killed']
            assert waited >= 0.4, f"it was killed before its grace ({waited:.2f} s)"
            await until("its slot has a new worker", lambda: all(r['pid'] not in (pid, None)
                                                                 for r in m.get_workers_info()
                                                                 if r['worker_id'] == 0
                                                                 or r['pid'] == pid) or n > 1, 10)
            nxt = await m.wait_for_job((await m.start_job('echo', text='after')).id, 20)
            assert nxt.status == 'completed' and nxt.worker_pid != pid
        finally: m.shutdown()
    run(main())

def test_grace_zero_ends_the_worker_at_once(no_leftover_processes):
    async def main():
        m, events = make(1, cancel_grace_seconds=0)
        try:
            await m.start()
            job = await m.start_job('progress', seconds=60, steps=6000)
            await until("the job runs", lambda: job.status == 'running')
            assert await m.cancel_job(job.id)
            assert job.status == 'cancelled' and await how(events, job) == ['killed']
        finally: m.shutdown()
    run(main())

def test_a_cancel_racing_the_jobs_own_end_ends_it_once(no_leftover_processes):
    async def main():
        m, events = make(1)
        try:
            await m.start()
            for delay in (0.0, 0.005, 0.01, 0.02, 0.04):
                job = await m.start_job('sleep', seconds=0.02)
                await until("the job runs", lambda: job.status == 'running')
                await asyncio.sleep(delay)
                cancelled = await m.cancel_job(job.id)
                done = await m.wait_for_job(job.id, 10)
                assert done.status == ('cancelled' if cancelled else 'completed'), (delay, cancelled,
                                                                                    done.status)
                ends = lambda: [k for k, d in events.events if d.get('job_id') == job.id
                                and k in ('completed', 'cancelled')]
                await until("its end's event", ends, 5)
                await asyncio.sleep(0.05)
                assert ends() == [done.status], ends()
            assert m.get_workers_info()[0]['restart_count'] == 0  # it always stopped, never killed
        finally: m.shutdown()
    run(main())

def test_cancelling_a_waiting_job_is_unchanged(no_leftover_processes):
    async def main():
        m, events = make(1)
        try:
            await m.start()
            busy = await m.start_job('sleep', seconds=0.5)
            waiting = await m.start_job('echo', text='never')
            assert await m.cancel_job(waiting.id)
            assert waiting.status == 'cancelled' and waiting.started_at is None
            assert await how(events, waiting) == [None]
            assert (await m.wait_for_job(busy.id, 10)).status == 'completed'
        finally: m.shutdown()
    run(main())
