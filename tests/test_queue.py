"""Issue 20: who goes next. Owners take turns, a higher priority starts first, each job knows its place and
its estimated wait, and a `queued` event says when either changes."""
import asyncio

import pytest

from helpers import make, run, until

pytestmark = pytest.mark.timeout(120)

def starts(events) -> list:
    "Job ids in the order their `started` events came."
    return [d['job_id'] for e, d in events.events if e == 'text:started']

def test_owners_take_turns(no_leftover_processes):
    "One worker; A submits 100 jobs, then B one: B's job starts after at most one more of A's."
    async def main():
        m, events = make(1, prefetch_jobs=0)
        try:
            await m.start()
            a = m.options(owner='A')
            first = await a.start_job('sleep', seconds=0.2)
            await until("A's first job runs", lambda: first.status == 'running')
            many = [await a.start_job('echo', text=str(i)) for i in range(100)]
            b = await m.options(owner='B').start_job('echo', text='b')
            await m.wait_for_job(b.id, timeout=30)
            for j in many: await m.wait_for_job(j.id, timeout=30)
            await until("every start announced", lambda: len(starts(events)) == 102)
        finally: m.shutdown()
        order = starts(events)
        assert order.index(b.id) - order.index(first.id) <= 2, order.index(b.id)  # at most one more of A's
    run(main())

@pytest.mark.parametrize('prefetch', [0, 1, 2])
def test_a_worker_is_handed_the_first_jobs_as_many_as_it_may_hold(no_leftover_processes, prefetch):
    ("One worker (nothing to decide but how many): once its job ends it runs the next and holds `prefetch_jobs` "
     "more, the first ones in order; those start before an urgent job submitted then, the others after it.")
    async def main():
        m, events = make(1, prefetch_jobs=prefetch)
        try:
            await m.start()
            first = await m.start_job('sleep', seconds=0.3)
            await until("the first job runs", lambda: first.status == 'running')
            rest = [await m.start_job('sleep', seconds=0.3) for _ in range(4)]
            await until("the next job runs", lambda: rest[0].status == 'running')
            urgent = await m.options(priority=5).start_job('echo', text='urgent')
            for j in rest + [urgent]: await m.wait_for_job(j.id, timeout=30)
            await until("every start announced", lambda: len(starts(events)) == 6)
        finally: m.shutdown()
        ids = [j.id for j in rest]
        assert starts(events) == [first.id] + ids[:prefetch + 1] + [urgent.id] + ids[prefetch + 1:]
    run(main())

def test_a_higher_priority_starts_first_and_without_an_owner_is_one_owner(no_leftover_processes):
    async def main():
        m, events = make(1, prefetch_jobs=0)
        try:
            await m.start()
            hold = await m.start_job('sleep', seconds=0.3)
            await until("the first job runs", lambda: hold.status == 'running')
            low = [await m.start_job('echo', text=f'low {i}') for i in range(3)]  # no owner: one owner
            urgent = await m.options(priority=5).start_job('echo', text='urgent')
            for j in low + [urgent]: await m.wait_for_job(j.id, timeout=30)
            await until("every start announced", lambda: len(starts(events)) == 5)
        finally: m.shutdown()
        assert starts(events)[1:] == [urgent.id] + [j.id for j in low]
    run(main())

def test_queue_position_estimate_and_queued_events(no_leftover_processes):
    async def main():
        m, events = make(2, prefetch_jobs=0)
        try:
            await m.start()
            for j in [await m.start_job('sleep', seconds=0.6) for _ in range(4)]:
                await m.wait_for_job(j.id, 30)
            # busy until cancelled below, once the last waiting job has been told its place (else a slow round
            # could start it first)
            busy = [await m.start_job('sleep', seconds=60, steps=600) for _ in range(2)]
            await until("both workers busy", lambda: all(j.status == 'running' for j in busy))
            waiting = [await m.options(owner='ann').start_job('sleep', seconds=0.6) for _ in range(4)]
            assert [m.queue_position(j.id) for j in waiting] == [0, 1, 2, 3]
            etas = [m.estimated_wait(j.id) for j in waiting]
            # the next two wait for the first two
            assert etas[2] > etas[0] + 0.1 and etas[3] > etas[1] + 0.1, etas
            assert 0.6 < etas[-1] < 2.5, etas  # two workers, about 0.6 s left, then 0.6 s jobs two at a time
            assert m.queue_position(busy[0].id) is None and m.estimated_wait('no such job') is None
            await until("a queued event for the last one",
                        lambda: any(e == 'text:queued' and d['job_id'] == waiting[-1].id
                                    for e, d in events.events))
            for j in busy: assert await m.cancel_job(j.id)
            for j in waiting: await m.wait_for_job(j.id, 30)
        finally: m.shutdown()
        queued = [d for e, d in events.events if e == 'text:queued']
        assert all(d['owner'] == 'ann' and d['eta_seconds'] >= 0 for d in queued)
        last = [d["position"] for d in queued if d["job_id"] == waiting[-1].id]
        # its place only moves forward
        assert last and last[0] <= 3 and last == sorted(last, reverse=True), last
    run(main())

def test_a_job_behind_a_long_one_is_told_its_place(no_leftover_processes):
    "Nothing moves after it is submitted: its `queued` event still comes, half a second on."
    async def main():
        m, events = make(1, prefetch_jobs=0)
        try:
            await m.start()
            long = await m.start_job('sleep', seconds=60)  # says nothing while it runs (no progress)
            await until("the long job runs", lambda: long.status == 'running')
            behind = await m.options(owner='ann').start_job('echo', text='behind')
            await until("a queued event for it",
                        lambda: any(e == 'text:queued' and d['job_id'] == behind.id for e, d in events.events))
            said = [d for e, d in events.events if e == 'text:queued']
            assert [(d['job_id'], d['owner'], d['position']) for d in said] == [(behind.id, 'ann', 0)], said
            assert behind.status == 'pending' and long.status == 'running'
            assert await m.cancel_job(long.id)
            assert (await m.wait_for_job(behind.id, 30)).status == 'completed'
        finally: m.shutdown()
    run(main())
