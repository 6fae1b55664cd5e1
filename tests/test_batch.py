"""Issue 22: batched execution. A plugin whose policy has `max_batch_size` > 1 gets up to that many waiting
jobs in one `execute_plugin_batch` call; each job starts, completes or fails on its own."""
import asyncio, time

import pytest

from cjm_fasthtml_workers.core.config import PluginPolicy
from helpers import make, run, until

pytestmark = pytest.mark.timeout(120)
BATCH = {'batch': PluginPolicy(max_batch_size=8, batch_wait_ms=50)}

def ends(events, kind):
    return {d['job_id'] for e, d in events.events if e == f'text:{kind}'}

def test_a_batch_of_mixed_success_and_failure(no_leftover_processes, backend):
    async def main():
        m, events = make(1, plugin_policies=BATCH, backend=backend)
        try:
            await m.start()
            jobs = [await (m.start_job('batch', text=f't{i}', fail=f'bad {i}') if i % 3 == 0 else
                           m.start_job('batch', text=f't{i}')) for i in range(8)]
            done = [await m.wait_for_job(j.id, 30) for j in jobs]
            await until("every progress event", lambda: len({d['job_id'] for e, d in events.events
                                                              if e == 'text:progress'}) == 8)
        finally: m.shutdown()
        for i, j in enumerate(done):
            if i % 3 == 0:
                assert j.status == 'failed' and j.error == f'bad {i}' and j.error_type == 'ValueError'
            else: assert j.status == 'completed' and j.result['text'] == f't{i}' and j.result['batch'] > 1, j
        assert len({j.worker_pid for j in done}) == 1  # no worker died
    run(main())

def test_cancelling_one_job_of_a_running_batch_leaves_the_others(no_leftover_processes):
    async def main():
        m, events = make(1, plugin_policies=BATCH)
        try:
            await m.start()
            jobs = [await m.start_job('batch', text=f't{i}', seconds=0.5) for i in range(4)]
            await until("the batch runs", lambda: all(j.status == 'running' for j in jobs))
            pid = jobs[0].worker_pid
            assert await m.cancel_job(jobs[1].id)
            done = [await m.wait_for_job(j.id, 30) for j in jobs]
            after = await m.wait_for_job((await m.start_job('echo', text='after')).id, 30)
        finally: m.shutdown()
        assert [j.status for j in done] == ['completed', 'cancelled', 'completed', 'completed']
        assert done[1].result is None and after.worker_pid == pid  # its result let go; the worker lives on
    run(main())

def test_a_death_inside_a_batch_fails_each_job(no_leftover_processes):
    async def main():
        m, events = make(1, plugin_policies=BATCH)
        try:
            await m.start()
            jobs = [await m.start_job('batch', text='x', crash=(i == 2)) for i in range(4)]
            done = [await m.wait_for_job(j.id, 30) for j in jobs]
        finally: m.shutdown()
        assert all(j.status == 'failed' and 'Worker died' in j.error for j in done), [(j.status, j.error)
                                                                                      for j in done]
    run(main())

def test_a_lone_job_waits_for_company_at_most_batch_wait(no_leftover_processes):
    async def main():
        m, events = make(1, plugin_policies={'batch': PluginPolicy(max_batch_size=8, batch_wait_ms=1000)})
        try:
            await m.start()
            t0 = time.monotonic()
            lone = await m.start_job('batch', text='alone')
            await asyncio.sleep(0.1)
            company = await m.start_job('batch', text='company')  # arrives within the wait: same batch
            done = [await m.wait_for_job(j.id, 30) for j in (lone, company)]
            took = time.monotonic() - t0
        finally: m.shutdown()
        assert [j.result['batch'] for j in done] == [2, 2]
        assert took < 3.0, took  # the hold (1 s) ended it: the lone job did not wait for a full batch
    run(main())

def test_a_hold_that_ends_while_no_worker_is_free_leaves_the_supervisor_waiting(no_leftover_processes):
    "A batch job whose hold ends while the only worker is busy waits: the supervisor does not spin."
    from helpers import TextJobManager
    class Counting(TextJobManager):
        rounds = 0
        def _monitor_results(self):  # the documented hook, called once a round
            Counting.rounds += 1
            super()._monitor_results()
    async def main():
        m, _ = make(1, cls=Counting, plugin_policies=BATCH, prefetch_jobs=0)
        try:
            await m.start()
            lone = await m.start_job('batch', text='x')  # held 50 ms for company, the worker free meanwhile
            busy = await m.start_job('sleep', seconds=2.0)  # takes the worker: none is free at the hold's end
            await until("the sleep job runs", lambda: busy.status == 'running')
            await asyncio.sleep(0.3)
            before = Counting.rounds
            await asyncio.sleep(1.0)
            rounds = Counting.rounds - before
            assert lone.status == 'pending'
            done = await m.wait_for_job(lone.id, 30)
        finally: m.shutdown()
        assert rounds < 50, f"{rounds} supervisor rounds in a second with nothing to do"
        assert done.status == 'completed'
    run(main())
