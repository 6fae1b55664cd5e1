"""Many users, one pool (issue 20, all but the order): owners and options, reads and cancel scoped by owner,
every job event naming its owner, QueueFull at the limits (and 429 in an app), streams scoped by owner over
HTTP, and a stream that reconnects with Last-Event-ID."""
import asyncio, os, re, sys, threading, time, uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import httpx, pytest

from cjm_fasthtml_workers.core.config import WorkerConfig
from cjm_fasthtml_workers.extensions.fasthtml import SSEBroadcaster, handle_queue_full, sse_response
from cjm_fasthtml_workers.managers.base import ANY_OWNER, BaseJob, BaseJobManager, QueueFull
from cjm_fasthtml_workers.testing import scenario_worker_process
from conftest import free_port, kill_tree, start_web_app, stop
from helpers import TextJob, TextJobManager as _TextJobManager, readme_app, run, until

class TextJobManager(_TextJobManager):
    made = 0  # create_job calls, to tell that a refused job was never made
    def create_job(self, plugin_id, **kwargs):
        TextJobManager.made += 1
        return super().create_job(plugin_id, **kwargs)

class Recorder:
    "Event broadcaster that records events by kind."
    def __init__(self): self.events = []
    async def broadcast(self, event_type, data): self.events.append((event_type.split(':', 1)[1], data))

def make(**cfg):
    events = Recorder()
    return TextJobManager('text', 'test', supports_streaming=True, event_broadcaster=events,
                          worker_config=WorkerConfig(**cfg)), events

# ----- reads and cancel, scoped -----------------------------------------------------------------------------
def test_every_read_and_cancel_is_scoped_to_its_owner(no_leftover_processes):
    async def main():
        m, _ = make()
        try:
            ann = await m.options(owner='ann').start_job('stream', text='one two three', stream=True)
            bob = await m.options(owner='bob').start_job('hang')
            nobody = await m.start_job('echo', text='no owner')
            await m.wait_for_job(ann.id, timeout=30, owner='ann')
            # every read of another owner's job: unknown
            assert m.get_job(ann.id, owner='bob') is None and m.get_job(ann.id, owner=None) is None
            assert m.get_job_result(ann.id, owner='bob') is None
            assert m.get_job_chunks(ann.id, owner='bob') == []
            with pytest.raises(KeyError): await m.wait_for_job(ann.id, timeout=5, owner='bob')
            with pytest.raises(KeyError):
                async for _ in m.stream_job(ann.id, owner='bob'): pass
            assert [j.id for j in m.get_all_jobs(owner='bob')] == [bob.id]
            # its own, and the default (every job, as before)
            assert m.get_job(ann.id, owner='ann') is ann and m.get_job(ann.id) is ann
            assert m.get_job_result(ann.id, owner='ann')['status'] == 'success'
            assert ''.join(m.get_job_chunks(ann.id, owner='ann')) == 'one two three'
            assert [c async for c in m.stream_job(ann.id, owner='ann')] == ['one ', 'two ', 'three']
            assert {j.id for j in m.get_all_jobs()} == {ann.id, bob.id, nobody.id}
            assert [j.id for j in m.get_all_jobs(owner=ANY_OWNER)] == [ann.id, bob.id, nobody.id]
            # None: the jobs without an owner
            assert [j.id for j in m.get_all_jobs(owner=None)] == [nobody.id]
            assert m.get_job(nobody.id, owner=None) is nobody and m.get_job(nobody.id, owner='ann') is None
            # cancel: another owner's job is not cancelled, and not touched
            await until("bob's job runs", lambda: bob.status == 'running')
            pid = m.get_workers_info()[0]['pid']
            assert await m.cancel_job(bob.id, owner='ann') is False
            assert await m.cancel_job(bob.id, owner=None) is False
            assert bob.status == 'running' and m.get_workers_info()[0]['pid'] == pid
            assert await m.cancel_job(bob.id, owner='bob') is True and bob.status == 'cancelled'
            assert (await m.wait_for_job(nobody.id, timeout=30, owner=None)).status == 'completed'
            assert m.clear_completed_jobs(owner='bob') == 1  # bob's ended job goes; the others' stay
            assert m.get_job(bob.id) is None and m.get_job(ann.id) is ann and m.get_job(nobody.id) is nobody
        finally: m.shutdown()
    run(main())

# ----- options ----------------------------------------------------------------------------------------------
def test_options_give_owner_priority_and_a_timeout_of_its_own(no_leftover_processes):
    async def main():
        m, _ = make()  # job_timeout_seconds None: no limit but the job's own
        try:
            slow = await m.options(owner='ann', priority=3, timeout=0.5).start_job('sleep', seconds=30)
            assert (slow.owner, slow.priority, slow.params) == ('ann', 3, {'seconds': 30})
            t0 = time.monotonic()
            done = await m.wait_for_job(slow.id, timeout=30)
            assert (done.status == 'failed'
                    and done.error == 'Job timed out after 0.5 s; the worker was ended'), done.error
            assert time.monotonic() - t0 < 20
            # the limit is that job's alone: the next job, without one, runs past it
            plain = await m.start_job('sleep', seconds=1.0)
            assert (await m.wait_for_job(plain.id, timeout=30)).status == 'completed'
            roomy = await m.options(timeout=20).start_job('sleep', seconds=0.8)
            assert (await m.wait_for_job(roomy.id, timeout=30)).status == 'completed'
            assert not m._book.timeouts  # forgotten once the jobs ended
        finally: m.shutdown()
    run(main())

def test_options_validate():
    m, _ = make()
    with pytest.raises(ValueError, match='timeout'): m.options(timeout=0)
    with pytest.raises(TypeError, match='priority'): m.options(priority=1.5)
    with pytest.raises(TypeError, match='owner'): m.options(owner=42)

def test_a_job_parameter_named_owner_is_not_an_option(no_leftover_processes):
    async def main():
        m, _ = make()
        try:
            plain = await m.start_job('echo', text='x', owner='mallory', priority=9, timeout=0.001)
            assert (plain.owner, plain.priority) == (None, 0)
            assert plain.params == {'text': 'x', 'owner': 'mallory', 'priority': 9, 'timeout': 0.001}
            opted = await m.options(owner='ann').start_job('echo', owner='mallory')
            assert (opted.owner, opted.params) == ('ann', {'owner': 'mallory'})
            for j in (plain, opted):  # the parameters reached the plugin, and no limit came of `timeout`
                done = await m.wait_for_job(j.id, timeout=30)
                assert done.status == 'completed' and done.result['params']['owner'] == 'mallory'
            after = await m.start_job('echo')  # the options were for one job
            assert after.owner is None
        finally: m.shutdown()
    run(main())

# ----- events -----------------------------------------------------------------------------------------------
def test_every_job_event_names_its_owner(no_leftover_processes):
    async def main():
        m, events = make()
        try:
            ann = m.options(owner='ann')
            jobs = [await ann.start_job('echo', text='hi'), await ann.start_job('fail'),
                    await ann.start_job('stream', text='a b', stream=True),
                    await ann.start_job('progress', steps=2)]
            for j in jobs: await m.wait_for_job(j.id, timeout=30)
            # after ann's: owners take turns, so bob's would otherwise run (and crash the worker) before her
            # third
            jobs.append(await m.options(owner='bob').start_job('kill'))
            await m.wait_for_job(jobs[-1].id, timeout=30)
            hang = await ann.start_job('hang')
            await until("the hang job runs", lambda: hang.status == 'running')
            await m.cancel_job(hang.id)
            await until("a worker restarted after the cancel",
                        lambda: any(k == 'worker_restarted' for k, _ in events.events))
        finally: m.shutdown()
        about_jobs = [(k, d) for k, d in events.events if 'job_id' in d]
        kinds = {k for k, _ in about_jobs}
        assert {'submitted', 'started', 'progress', 'chunk', 'completed', 'failed', 'cancelled',
                'worker_died'} <= kinds
        owner_of = {j.id: j.owner for j in jobs + [hang]}
        assert all(d['owner'] == owner_of[d['job_id']] for k, d in about_jobs), about_jobs
        died = [d for k, d in events.events if k == 'worker_died' and d.get('job_id') == jobs[-1].id]
        assert died and died[0]['owner'] == 'bob'
        assert all('owner' not in d for k, d in events.events if k == 'worker_restarted')  # about no job
    run(main())

def test_a_page_of_one_owner_sees_no_job_of_another(no_leftover_processes):
    "Through the SSEBroadcaster: bob's job crashes its worker; ann's page sees the worker die, not bob's job."
    async def main():
        events = SSEBroadcaster()
        m = TextJobManager('text', 'test', event_broadcaster=events)
        ann_q, all_q = events.subscribe(owner='ann'), events.subscribe()
        try:
            mine = await m.options(owner='ann').start_job('echo', text='mine')
            await m.wait_for_job(mine.id, timeout=30)
            bobs = await m.options(owner='bob').start_job('kill')
            await m.wait_for_job(bobs.id, timeout=30)
            await until("the worker_died event on the unscoped page",
                        lambda: any(e and e.kind == 'worker_died' for e in list(all_q._queue)))
        finally: m.shutdown()
        seen = [e for e in list(ann_q._queue) if e is not None]
        assert not [e for e in seen if bobs.id in repr(e.data) or e.data.get('owner') == 'bob'], seen
        assert [e.kind for e in seen if e.data.get('job_id') == mine.id] == ['submitted', 'started',
                                                                             'completed']
        died = [e for e in seen if e.kind == 'worker_died']
        assert died and not {'job_id', 'owner', 'result', 'error'} & died[0].data.keys(), died
        assert [e.data['job_id'] for e in list(all_q._queue) if e and e.kind == 'worker_died'] == [bobs.id]
    run(main())

# ----- the job store ----------------------------------------------------------------------------------------
def test_the_store_keeps_owner_and_priority(tmp_path, no_leftover_processes):
    ("Owner and priority survive a restart; a recovered pending job counts as its owner's; "
     "an old record reads back.")
    import pickle
    from cjm_fasthtml_workers.managers.store import SQLiteJobStore, load_record
    db = tmp_path/'jobs.db'
    async def first():
        m = TextJobManager('text', 'test', job_store=SQLiteJobStore(db))
        try:
            done = await m.options(owner='ann', priority=2).start_job('echo', text='hi')
            await m.wait_for_job(done.id, timeout=30)
            busy = await m.start_job('sleep', seconds=5.0)
            waiting = await m.options(owner='bob', priority=-1).start_job('echo', text='later')
            while busy.status != 'running': await asyncio.sleep(0.005)
            return done, waiting
        finally: m.shutdown()  # `waiting` stays stored as pending
    done, waiting = run(first())
    async def second():
        m = TextJobManager('text', 'test', job_store=SQLiteJobStore(db))
        try:
            back = m.get_job(done.id, owner='ann')
            assert (back.owner, back.priority, back.status) == ('ann', 2, 'completed')
            assert m.get_job(done.id, owner='bob') is None
            assert m._book.pending_by_owner == {'bob': 1}  # the recovered pending job is bob's
            ran = await m.wait_for_job(waiting.id, timeout=30, owner='bob')
            assert (ran.owner, ran.priority, ran.status) == ('bob', -1, 'completed')
        finally: m.shutdown()
    run(second())
    old = TextJob('j', 'echo')
    del old.__dict__['owner'], old.__dict__['priority']  # a record written before jobs had owners
    back = load_record(pickle.dumps(old, 5))
    assert (back.owner, back.priority) == (None, 0)

# ----- admission --------------------------------------------------------------------------------------------
async def _full_refusal(m, events, owner):
    "A start_job past a limit: QueueFull with a retry_after; nothing made, kept or announced."
    submitted = lambda: sum(kind == 'submitted' for kind, _ in events.events)
    await until("the jobs before it told", lambda: submitted() == len(m.get_all_jobs()))
    made, jobs, n_submitted = TextJobManager.made, len(m.get_all_jobs()), submitted()
    with pytest.raises(QueueFull) as info: await m.options(owner=owner).start_job('echo', text='one too many')
    await asyncio.sleep(0.05)  # an event of it, had one been sent, has been delivered
    assert (TextJobManager.made, len(m.get_all_jobs()), submitted()) == (made, jobs, n_submitted)
    # (the other events, a `queued` report of the jobs that wait, say: only jobs the manager holds)
    assert {d.get('job_id') for _, d in events.events} <= {j.id for j in m.get_all_jobs()} | {None}
    assert isinstance(info.value, RuntimeError) and info.value.retry_after > 0
    return info.value

def test_queue_full_at_the_total_limit(no_leftover_processes):
    async def main():
        m, events = make(max_pending_jobs=3)
        try:
            hang = await m.start_job('hang')
            await until("the hang job runs", lambda: hang.status == 'running')  # running: no longer pending
            waiting = [await m.options(owner=o).start_job('echo') for o in ('ann', 'bob', None)]
            e = await _full_refusal(m, events, 'cy')
            assert 'max_pending_jobs=3' in str(e)
            await m.cancel_job(waiting[0].id)  # one fewer waits: one more is let in
            extra = await m.options(owner='cy').start_job('echo')
            await m.cancel_job(hang.id)
            for j in waiting[1:] + [extra]:
                assert (await m.wait_for_job(j.id, timeout=30)).status == 'completed'
        finally: m.shutdown()
    run(main())

def test_queue_full_per_owner(no_leftover_processes):
    async def main():
        m, events = make(max_pending_per_owner=2)
        try:
            hang = await m.options(owner='ann').start_job('hang')
            await until("the hang job runs", lambda: hang.status == 'running')
            ann = [await m.options(owner='ann').start_job('echo') for _ in range(2)]
            e = await _full_refusal(m, events, 'ann')
            assert 'max_pending_per_owner=2' in str(e)
            bob = [await m.options(owner='bob').start_job('echo') for _ in range(2)]  # another owner: welcome
            nobody = [await m.start_job('echo') for _ in range(2)]  # jobs without an owner count as one owner
            with pytest.raises(QueueFull): await m.start_job('echo')
            await m.cancel_job(hang.id)
            for j in ann + bob + nobody: await m.wait_for_job(j.id, timeout=30)
            again = await m.options(owner='ann').start_job('echo')  # none of ann's waits now
            assert (await m.wait_for_job(again.id, timeout=30)).status == 'completed'
            assert not m._book.unstarted and not m._book.pending_by_owner
        finally: m.shutdown()
    run(main())

def test_queue_full_holds_for_submissions_that_overlap(no_leftover_processes):
    ("Large jobs pickle on a thread, so submissions overlap: the limit still holds, "
     "checked again as the job is queued.")
    async def main():
        m, events = make(max_pending_jobs=3)
        try:
            hang = await m.start_job('hang')
            await until("the hang job runs", lambda: hang.status == 'running')
            big = 'x' * (2 << 20)  # past the size that is pickled off the event loop
            out = await asyncio.gather(*(m.start_job('echo', text=big) for _ in range(8)),
                                       return_exceptions=True)
            assert sum(isinstance(o, QueueFull) for o in out) == 5, out
            assert len(m._book.unstarted) == 3 and len(m.get_all_jobs()) == 4
            await m.cancel_job(hang.id)
        finally: m.shutdown()
    run(main())

def test_queue_full_is_429_with_retry_after(no_leftover_processes):
    ("Through a FastHTML app: a session past max_pending_per_owner gets 429 and Retry-After; "
     "another is served.")
    from fasthtml.common import FastHTML
    from starlette.testclient import TestClient
    from cjm_fasthtml_workers.extensions.fasthtml import worker_lifespan
    m = TextJobManager('text', 'test', worker_config=WorkerConfig(max_pending_per_owner=1))
    app = FastHTML(default_hdrs=False, secret_key='test', lifespan=worker_lifespan(m))
    handle_queue_full(app)

    @app.post('/jobs')
    async def submit(session, plugin:str='echo'):
        owner = session.setdefault('owner', uuid.uuid4().hex)
        return (await m.options(owner=owner).start_job(plugin)).id

    with TestClient(app) as client:  # its cookie jar is ann's session, then (cleared) bob's
        assert client.post('/jobs', data={'plugin': 'hang'}).status_code == 200
        deadline = time.monotonic() + 20
        while m.get_all_jobs()[0].status != 'running' and time.monotonic() < deadline: time.sleep(0.01)
        assert client.post('/jobs').status_code == 200  # one of ann's waits
        r = client.post('/jobs')
        assert r.status_code == 429, r.text
        assert int(r.headers['retry-after']) >= 1 and 'max_pending_per_owner=1' in r.text
        assert len(m.get_all_jobs()) == 2  # the refused one was not kept
        client.cookies.clear()
        assert client.post('/jobs').status_code == 200  # bob's first
        owners = [j.owner for j in m.get_all_jobs()]
        assert len(owners) == 3 and owners[0] == owners[1] != owners[2], owners
    # the lifespan shut the manager down, ending the hanging job

# ----- the README app over HTTP -----------------------------------------------------------------------------
class WatchedJob(TextJob):
    "A job that notes, each time its status is set past 'pending', what its manager then counts of it."
    manager = None  # set by the test
    def __setattr__(self, name, value):
        m = type(self).manager
        if name == 'status' and value != 'pending' and m is not None:
            s = m.stats.snapshot()
            waits, ends = sum(h.count for h in s.wait.values()), sum(s.ended.values())
            m.seen.append((value, m._book.pending_by_owner.get(self.owner, 0), waits, ends))
        super().__setattr__(name, value)

class WatchedJobManager(TextJobManager):
    def create_job(self, plugin_id, **kwargs):
        return WatchedJob(id=uuid.uuid4().hex, plugin_id=plugin_id, params=kwargs)

def test_a_new_status_comes_with_its_counts(no_leftover_processes):
    "Code that sees a job start or end finds its owner's pending count and the stats already moved."
    async def main():
        m = WatchedJobManager('text', 'test', supports_streaming=True, worker_config=WorkerConfig())
        WatchedJob.manager, m.seen = m, []
        try:
            job = await m.options(owner='ann').start_job('echo', text='hi')
            assert (await m.wait_for_job(job.id, timeout=30)).status == 'completed'
            # as it read 'running': no longer pending, its wait counted; as it read 'completed': its end counted
            assert m.seen == [('running', 0, 1, 0), ('completed', 0, 1, 1)], m.seen
        finally: WatchedJob.manager = None; m.shutdown()
    run(main())

class OwnStream:
    "One browser session's /events, read on a thread: (id, data) of each SSE message."
    def __init__(self, client:httpx.Client, url:str, last_event_id:str=None):
        self.client, self.messages, self.opened, self.ended = client, [], threading.Event(), threading.Event()
        self.stop = False
        headers = {'Last-Event-ID': last_event_id} if last_event_id else {}
        self.thread = threading.Thread(target=self._read, args=(url, headers), daemon=True)
        self.thread.start()
        assert self.opened.wait(10), "the event stream did not open"

    def _read(self, url, headers):
        try:
            with self.client.stream('GET', url, headers=headers, timeout=httpx.Timeout(5, read=60)) as r:
                self.opened.set()
                event_id, lines = None, []
                for line in r.iter_lines():
                    if self.stop: return
                    if line.startswith('id: '): event_id = line[4:]
                    elif line.startswith('data: '): lines.append(line[6:])
                    elif not line and lines:
                        self.messages.append((event_id, '\n'.join(lines)))
                        event_id, lines = None, []
        except httpx.HTTPError: pass
        finally: self.ended.set()

    def text(self) -> str: return '\n'.join(d for _, d in self.messages)

def _submit(client, base, n):
    "POST n jobs in this session; a 429 is retried after a moment (the queue drains meanwhile)."
    refused = 0
    for i in range(n):
        while (r := client.post(f'{base}/jobs', data={'text': f'job {i}'}, timeout=10)).status_code == 429:
            assert int(r.headers['retry-after']) >= 1
            refused += 1
            time.sleep(0.05)
        assert r.status_code == 200, r.text
    return refused

def test_two_owners_200_jobs_each_through_the_readme_app(tmp_path, no_leftover_processes):
    "Two browser sessions, 200 jobs each, at once: each page's stream carries no event of the other's jobs."
    app = readme_app()
    assert 'seconds=2, steps=4' in app
    (tmp_path/'app.py').write_text(app.replace('seconds=2, steps=4', 'seconds=0, steps=1'))  # quick jobs
    port = free_port()
    base = f'http://127.0.0.1:{port}'
    proc = start_web_app([sys.executable, 'app.py'], tmp_path, port, {**os.environ, 'PORT': str(port)})
    try:
        browsers = [httpx.Client(), httpx.Client()]
        for b in browsers: b.get(base + '/', timeout=5)  # each gets its session (its owner)
        streams = [OwnStream(b, base + '/events') for b in browsers]
        refused = [0, 0]
        def submit(i): refused[i] = _submit(browsers[i], base, 200)
        threads = [threading.Thread(target=submit, args=(i,)) for i in (0, 1)]
        for t in threads: t.start()
        for t in threads: t.join(120)
        ids = [set(re.findall(r'id="job-(\w+)"', b.get(base + '/', timeout=10).text)) for b in browsers]
        assert [len(s) for s in ids] == [200, 200] and not ids[0] & ids[1]
        deadline = time.monotonic() + 60
        while (time.monotonic() < deadline and
               any(len(set(re.findall(r'<strong>completed</strong> (\w+):', s.text()))) < 200
                   for s in streams)):
            time.sleep(0.1)
        for mine, theirs, s in ((ids[0], ids[1], streams[0]), (ids[1], ids[0], streams[1])):
            seen = set(re.findall(r'id="job-(\w+)"', s.text()))
            # every event of its own; 0 of the other's
            assert seen == mine, (len(seen - mine), len(mine - seen))
            assert not any(t in s.text() for t in theirs)
            assert len(set(re.findall(r'<strong>completed</strong> (\w+):', s.text()))) == 200
            assert all(event_id for event_id, _ in s.messages)  # every message has an id
        stop(proc)
    finally: kill_tree(proc)

# ----- a stream that reconnects -----------------------------------------------------------------------------
def test_a_reconnect_with_last_event_id_loses_no_chunk(no_leftover_processes):
    "A page's connection drops mid-stream; it reconnects with the last id it got and the text has no hole."
    import uvicorn
    from fasthtml.common import FastHTML
    from cjm_fasthtml_workers.extensions.fasthtml import worker_lifespan
    events = SSEBroadcaster()
    m = TextJobManager('text', 'test', supports_streaming=True, event_broadcaster=events)
    app = FastHTML(default_hdrs=False, secret_key='test', lifespan=worker_lifespan(m, broadcaster=events))
    def owner(session): return session.setdefault('owner', uuid.uuid4().hex)
    def render(e): return f"{e.kind}:{e.data.get('job_id')}:{e.data.get('chunk', '')}"

    @app.get('/events')
    def stream(session): return sse_response(events, render, owner=owner(session))

    @app.post('/jobs')
    async def submit(session, text:str):
        return (await m.options(owner=owner(session)).start_job('stream', text=text, delay=0.02,
                                                                stream=True)).id

    port = free_port()
    base = f'http://127.0.0.1:{port}'
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning'))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline: time.sleep(0.05)
        words = [f'w{i}' for i in range(150)]
        page, other = httpx.Client(), httpx.Client()
        first = OwnStream(page, base + '/events')
        theirs = OwnStream(other, base + '/events')
        their_job = other.post(base + '/jobs', data={'text': 'not yours'}, timeout=10).text
        job_id = page.post(base + '/jobs', data={'text': ' '.join(words)}, timeout=10).text
        deadline = time.monotonic() + 20
        while sum(d.startswith('chunk:') for _, d in first.messages) < 20 and time.monotonic() < deadline:
            time.sleep(0.005)
        first.stop = True  # the connection drops: the reader closes it at the next line
        assert first.ended.wait(5)
        got = list(first.messages)
        time.sleep(0.5)  # the job streams on meanwhile
        seq_at_reconnect = events.seq
        second = OwnStream(page, base + '/events', last_event_id=got[-1][0])
        deadline = time.monotonic() + 30
        while not any(d.startswith('completed:') for _, d in second.messages) and time.monotonic() < deadline:
            time.sleep(0.02)
        chunks = [d.split(':', 2)[2] for _, d in got + second.messages if d.startswith(f'chunk:{job_id}:')]
        assert ''.join(chunks) == ' '.join(words), chunks  # no hole, nothing twice
        ids = [i for i, _ in got + second.messages]
        assert len(ids) == len(set(ids))
        n_before = sum(d.startswith('chunk:') for _, d in got)
        replayed = [d for i, d in second.messages if int(i.split('-')[1]) <= seq_at_reconnect
                    and d.startswith('chunk:')]
        # dropped mid-stream, caught up
        assert 20 <= n_before < 140 and len(replayed) >= 5, (n_before, len(replayed))
        assert not any(their_job in d for _, d in got + second.messages)  # the other owner's job: never
        assert any(their_job in d for _, d in theirs.messages)  # though its own page got it
    finally:
        events.close_soon()  # what the exit signal does under a server on the main thread: the streams end
        server.should_exit = True
        thread.join(15)
    assert not thread.is_alive() and m._closed  # the lifespan shut the manager down

# ----- benchmarks/queue_full.py keeps working ---------------------------------------------------------------
def test_queue_full_benchmark_runs(tmp_path, no_leftover_processes):
    "A quick run exits 0 and reports each shape with numbers (no timing is asserted)."
    import json, subprocess
    out = tmp_path/'queue_full.json'
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1]/'benchmarks'/'queue_full.py'),
                           '--quick',
                           '--json', str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())['shapes']
    assert list(rows) == ['accepted', 'refused_total', 'refused_owner']
    for row in rows.values():
        assert row['title'] in proc.stdout and row['median_ms'] > 0 and row['ratio']['median'] > 0
    assert rows['refused_total']['met'] in (True, False)
