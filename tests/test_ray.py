"The Ray backend (issue 12): the manager's fault matrix with every worker a subprocess of a Ray host actor."
import asyncio, functools, os, random, signal, subprocess, sys, textwrap, time, uuid

import psutil, pytest

ray = pytest.importorskip('ray', reason="the Ray backend needs ray: pip install -e '.[ray]'")

import cjm_fasthtml_workers.backends.ray as ray_backend
from cjm_fasthtml_workers.backends.ray import RayWorker
from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
from cjm_fasthtml_workers.core.worker import TOKEN_ENV
from cjm_fasthtml_workers.managers.base import TERMINAL_STATUSES
from cjm_fasthtml_workers.testing import closing_worker_process, raw_writer_process, scenario_worker_process
from conftest import pid_gone
from test_manager import Recorder, TextJobManager, assert_terminal, finish, run, until

# ----- one local Ray instance for the module; nothing of ours outlives a test ------------------------------------
MARK_ENV, MARK = 'CJM_TEST_RAY_INSTANCE', uuid.uuid4().hex  # in the environment of every process of our instance

@pytest.fixture(scope='module', autouse=True)
def ray_instance():
    "Two CPUs and two logical GPUs (Ray hands them out without a driver), on loopback, no dashboard."
    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _node_ip_address='127.0.0.1',
             runtime_env={'env_vars': {MARK_ENV: MARK}})
    yield
    ray.shutdown()

def token_carriers() -> list:
    "Our workers and whatever they started: processes with a worker's token and our instance's mark."
    out = []  # other programs on this machine (another test run) have workers with tokens too: not ours
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if TOKEN_ENV in env and env.get(MARK_ENV) == MARK: out.append(p)
        except (psutil.Error, OSError): pass
    return out

def live_hosts() -> list:
    "Host actors Ray does not count as dead (the state API without a dashboard: the GCS's actor table)."
    return [a for a in ray._private.state.actors().values()
            if a['ActorClassName'] == 'RayWorkerHost' and a['State'] != 'DEAD']

@pytest.fixture
def nothing_left():
    "Every test ends with no host actor, no worker process (nor anything a worker started) and every GPU free."
    yield
    def left(): return token_carriers(), live_hosts(), ray.available_resources().get('GPU')
    deadline = time.monotonic() + 10
    while left() != ([], [], 2.0) and time.monotonic() < deadline: time.sleep(0.05)
    procs, hosts, gpus = left()
    for p in procs:  # ours, by the mark: ended so that the next test starts clean
        try: p.kill()
        except psutil.Error: pass
    assert not procs and not hosts and gpus == 2.0, \
        f"left behind: processes {[p.pid for p in procs]}, {len(hosts)} actors, {2.0 - gpus} GPUs held"

def make(policy=RestartPolicy.ON_CANCELLATION, **cfg):
    events = Recorder()
    m = TextJobManager('text', 'test', supports_streaming=True, event_broadcaster=events,
                       worker_config=WorkerConfig(restart_policy=policy, backend='ray', **cfg))
    return m, events

def host_of(m):
    "The first worker's host actor."
    return m._supervisor.slots[0].worker.transport.actor

# ----- happy path ------------------------------------------------------------------------------------------------
def test_many_jobs_in_order(nothing_left):
    async def main():
        m, events = make()
        try:
            jobs = [await m.start_job('echo', text=f'job {i}') for i in range(40)]
            done = [await finish(m, j) for j in jobs]
            assert [j.result['text'] for j in done] == [f'job {i}' for i in range(40)]
            assert all(j.status == 'completed' and j.worker_pid for j in done)
            ends = [j.completed_at for j in done]
            assert ends == sorted(ends)
            await asyncio.sleep(0.05)
            assert all(events.of(j.id) == ['submitted', 'started', 'completed'] for j in jobs)
            node = ray.get_runtime_context().get_node_id()
            assert all(d['node'] == node for e, d in events.events if e == 'text:started')
            row = m.get_workers_info()[0]
            assert row['node'] == node and row['gpu'] is None  # no GPU asked for: none given
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

def test_event_loop_never_waits_on_ray(nothing_left):
    "A 1 ms ticker keeps ticking through submissions, a cancel and a reload: sends never wait on Ray."
    async def main():
        m, _ = make()
        stalls, stop = [], False
        async def ticker():
            last = time.perf_counter()
            while not stop:
                await asyncio.sleep(0.001)
                now = time.perf_counter(); stalls.append(now - last); last = now
        try:
            await m.start()
            t = asyncio.create_task(ticker())
            jobs = [await m.start_job('echo', text=str(i), blob=b'x' * (1 << 20) if i % 10 == 0 else b'')
                    for i in range(100)]
            hang = await m.start_job('hang')
            await until(lambda: hang.status == 'running')
            await m.cancel_job(hang.id)
            assert await m.reload_plugin('echo', {'prefix': '>'})
            for j in jobs: assert (await finish(m, j)).status == 'completed'
            stop = True; await t
        finally: m.shutdown()
        worst = max(stalls) - 0.001
        assert worst < 0.1, f"event loop stalled for {worst * 1000:.0f} ms"
    run(main())

# ----- cancellation ------------------------------------------------------------------------------------------------
def test_cancel_pending_leaves_worker(nothing_left):
    async def main():
        m, events = make()
        try:
            await m.start()
            pid = m.worker_process.pid
            slow = await m.start_job('sleep', seconds=0.3)
            victim = await m.start_job('echo', text='x')
            after = await m.start_job('echo', text='y')
            assert await m.cancel_job(victim.id)
            assert (await finish(m, after)).result['text'] == 'y'
            assert victim.status == 'cancelled' and victim.started_at is None
            assert slow.status == 'completed' and m.worker_process.pid == pid and m.restart_count == 0
            await asyncio.sleep(0.05)
            assert events.of(victim.id) == ['submitted', 'cancelled']
        finally: m.shutdown()
    run(main())

def test_cancel_running_ends_its_whole_tree(nothing_left, tmp_path):
    async def main():
        m, events = make()
        try:
            pid_file = tmp_path / 'child.pid'
            job = await m.start_job('spawn', pid_file=str(pid_file))
            behind = [await m.start_job('echo', text=str(i)) for i in range(3)]
            await until(lambda: pid_file.exists() and pid_file.read_text())
            pid, grandchild = m.worker_process.pid, int(pid_file.read_text())
            actor = host_of(m)
            assert await m.cancel_job(job.id)
            assert pid_gone(grandchild), "the plugin's own subprocess outlived the cancellation"
            assert pid_gone(pid)
            done = [await finish(m, j) for j in behind]
            assert [j.result['text'] for j in done] == ['0', '1', '2']
            assert job.status == 'cancelled' and m.restart_count == 1 and m.worker_process.pid != pid
            assert host_of(m) is not actor  # the cancelled worker's actor was ended, a new one hosts its successor
            await asyncio.sleep(0.05)
            assert 'worker_restarted' in events.kinds()
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

# ----- crashes: each way, each restart policy ------------------------------------------------------------------------
CRASHES = {'kill': ({}, 'SIGKILL'), 'segv': ({}, 'SIGSEGV'), 'exit': ({'code': 3}, 'exited with code 3')}

@pytest.mark.parametrize('crash,policy', [('kill', RestartPolicy.ALWAYS), ('segv', RestartPolicy.BACKOFF),
                                          ('exit', RestartPolicy.NEVER), ('kill', RestartPolicy.ON_CANCELLATION)])
def test_crash_matrix(nothing_left, crash, policy):
    async def main():
        m, events = make(policy, restart_backoff_base_seconds=0.1)
        try:
            await m.start()
            pid = m.worker_process.pid
            params, reason = CRASHES[crash]
            first = await m.start_job('sleep', seconds=0.3)
            bad = await m.start_job(crash, **params)
            behind = await m.start_job('echo', text='behind')
            assert (await finish(m, first)).status == 'completed'
            bad = await finish(m, bad)
            assert bad.status == 'failed' and reason in bad.error, bad.error
            assert bad.worker_pid == pid
            behind = await finish(m, behind)
            if policy in (RestartPolicy.ALWAYS, RestartPolicy.BACKOFF):
                assert behind.status == 'completed' and behind.worker_pid != pid and m.restart_count == 1
            else:
                assert behind.status == 'failed' and 'not restarted' in behind.error, behind.error
                assert m.worker_process is None and m.restart_count == 0
            assert pid_gone(pid)
            assert (await finish(m, await m.start_job('echo', text='again'))).status == 'completed'
            await asyncio.sleep(0.05)
            died = [d for e, d in events.events if e == 'text:worker_died']
            assert died[0]['job_id'] == bad.id and died[0]['pid'] == pid and reason in died[0]['reason']
            assert died[0]['node'] == ray.get_runtime_context().get_node_id()
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

def test_job_timeout(nothing_left, tmp_path):
    async def main():
        m, _ = make(job_timeout_seconds=0.5)
        try:
            pid_file = tmp_path / 'child.pid'
            hung = await m.start_job('spawn', pid_file=str(pid_file))
            behind = await m.start_job('echo', text='next')
            hung = await finish(m, hung)
            assert hung.status == 'failed' and 'timed out after 0.5 s' in hung.error, hung.error
            assert pid_gone(int(pid_file.read_text()))
            assert (await finish(m, behind)).status == 'completed'
        finally: m.shutdown()
    run(main())

# ----- streaming, progress, plugin commands ------------------------------------------------------------------------
def test_streaming_arrives_while_running(nothing_left):
    async def main():
        m, events = make()
        try:
            job = await m.start_job('stream', text='a b c d e', delay=0.1, stream=True)
            seen = [(chunk, job.status) async for chunk in m.stream_job(job.id)]
            assert [c for c, _ in seen] == ['a ', 'b ', 'c ', 'd ', 'e']
            assert seen[0][1] == 'running'  # the first chunk came before the job ended
            assert (await finish(m, job)).result == {'streamed': True}
            await asyncio.sleep(0.05)
            assert events.of(job.id) == ['submitted', 'started'] + ['chunk'] * 5 + ['completed']
        finally: m.shutdown()
    run(main())

def test_flood_of_chunks_arrives_whole_and_in_order(nothing_left, monkeypatch):
    "20000 chunks as fast as the worker makes them, the relay held back past 8 unread: none lost or reordered."
    monkeypatch.setattr(ray_backend, '_HIGH_WATER', 8)  # the supervisor lags all the time
    async def main():
        m, _ = make()
        try:
            text = ' '.join(f'w{i}' for i in range(20000))
            job = await finish(m, await m.start_job('stream', text=text, stream=True), timeout=60)
            assert job.status == 'completed' and ''.join(m.get_job_chunks(job.id)) == text
            assert (await finish(m, await m.start_job('echo', text='after'))).status == 'completed'
        finally: m.shutdown()
    run(main())

def test_progress(nothing_left):
    async def main():
        m, events = make()
        try:
            job = await finish(m, await m.start_job('sleep', seconds=0.4, steps=4))
            assert (job.progress, job.progress_message) == (1.0, 'step 4 of 4')
            await asyncio.sleep(0.05)
            assert [d['progress'] for e, d in events.events if e == 'text:progress'] == [0.25, 0.5, 0.75, 1.0]
        finally: m.shutdown()
    run(main())

def test_reload_and_unload(nothing_left):
    async def main():
        m, _ = make()
        try:
            assert await m.reload_plugin('echo', {'prefix': 'A:'})
            assert (await finish(m, await m.start_job('echo', text='1'))).result['text'] == 'A:1'
            assert not await m.reload_plugin('echo', {'fail_load': True})
            assert await m.reload_plugin('echo', {'prefix': 'C:'})
            assert await m.unload_plugin('echo')
            hist = await finish(m, await m.start_job('history'))
            assert hist.result['events'][-2:] == ['unload echo', 'load history']
            job = await m.start_job('hang')  # a restarted worker (a new actor) keeps the reloaded configuration
            await until(lambda: job.status == 'running')
            await m.cancel_job(job.id)
            assert (await finish(m, await m.start_job('echo', text='3'))).result['text'] == 'C:3'
        finally: m.shutdown()
    run(main())

# ----- what a worker writes: unreadable objects, garbage, closed pipes -------------------------------------------------
def test_unreadable_result_fails_only_its_job(nothing_left):
    "An object only the worker can rebuild crosses the actor as bytes: its job fails saying so, the worker goes on."
    async def main():
        m, _ = make()
        try:
            bad = await finish(m, await m.start_job('alien'))
            assert bad.status == 'failed' and bad.error_type == 'UnreadableResult', bad.error
            assert 'cjm_worker_only.Alien' in bad.error
            ok = await finish(m, await m.start_job('echo', text='fine'))
            assert ok.status == 'completed' and ok.worker_pid == bad.worker_pid and m.restart_count == 0
        finally: m.shutdown()
    run(main())

class StreamManager(TextJobManager):
    "Its worker writes garbage first, or closes its pipes and lives on."
    def __init__(self, entry_point, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entry_point = entry_point
    def get_worker_entry_point(self): return self.entry_point

@pytest.mark.parametrize('entry_point,error', [
    (functools.partial(raw_writer_process, raw=b'garbage!'), 'unreadable stream'),
    (closing_worker_process, 'closed its pipes to the manager but did not exit')])
def test_broken_stream_ends_the_worker(nothing_left, entry_point, error):
    async def main():
        m = StreamManager(entry_point, 'text', 'test', worker_config=WorkerConfig(backend='ray'))
        try:
            with pytest.raises(RuntimeError, match=error): await m.start()
        finally: m.shutdown()
    run(main())

# ----- shutdown --------------------------------------------------------------------------------------------------
def test_shutdown_with_work_in_flight(nothing_left, tmp_path):
    async def main():
        m, events = make()
        pid_file = tmp_path / 'child.pid'
        running = await m.start_job('spawn', pid_file=str(pid_file))
        waiting = [await m.start_job('echo', text=str(i)) for i in range(3)]
        await until(lambda: running.status == 'running' and pid_file.exists() and pid_file.read_text())
        pid, grandchild = m.worker_process.pid, int(pid_file.read_text())
        t0 = time.monotonic()
        m.shutdown()
        m.shutdown()
        assert time.monotonic() - t0 < m.worker_config.shutdown_timeout_seconds + 3
        assert all(j.status == 'cancelled' for j in [running] + waiting)
        assert pid_gone(pid) and pid_gone(grandchild)
        with pytest.raises(RuntimeError, match='shut down'): await m.start_job('echo')
    run(main())

def test_shutdown_idle_is_graceful(nothing_left):
    async def main():
        m, _ = make()
        await m.start()
        proc = m.worker_process
        m.shutdown()
        assert proc.exitcode == 0 and not proc.is_alive()  # STOP answered on the node, not terminated
        assert m.get_workers_info()[0]['state'] == 'stopped'
    run(main())

def test_interpreter_exit_with_ray_started_by_the_manager(nothing_left, tmp_path):
    "An app that lets the manager start Ray, and exits without shutdown(): one exit, prompt, and nothing left."
    mark = uuid.uuid4().hex
    script = tmp_path / 'app.py'
    script.write_text(textwrap.dedent('''
        import asyncio, sys
        sys.path.insert(0, %r)
        from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
        from test_manager import TextJobManager
        async def main():
            options = dict(num_cpus=1, include_dashboard=False, _node_ip_address='127.0.0.1',
                           runtime_env={'env_vars': {%r: %r}})
            m = TextJobManager('text', 'test', worker_config=WorkerConfig(
                backend='ray', restart_policy=RestartPolicy.ALWAYS, ray_init_options=options))
            job = await m.start_job('hang')
            while job.status != 'running': await asyncio.sleep(0.01)
            print(m.worker_process.pid, flush=True)
        if __name__ == '__main__': asyncio.run(main())
    ''' % (os.path.dirname(__file__), MARK_ENV, mark)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - t0 < 10, "the app took too long to exit"
    assert err.count('Started a local Ray instance') == 1, err[-3000:]  # a restart at exit starts no second one
    assert pid_gone(pid)
    def theirs(p):
        try: return p.environ().get(MARK_ENV) == mark
        except (psutil.Error, OSError): return False
    deadline = time.monotonic() + 10
    while (left := [p.pid for p in psutil.process_iter() if theirs(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"the app's Ray left processes behind: {left}"

# ----- soak ------------------------------------------------------------------------------------------------------
def test_soak_random_kills(nothing_left):
    "100 jobs while the worker is SIGKILLed at random: every job ends exactly once, results are right."
    async def main():
        m, events = make(RestartPolicy.ALWAYS, max_restart_attempts=1000)
        rng = random.Random(1234)
        try:
            jobs = [await m.start_job(rng.choice(['echo', 'echo', 'sleep']), text=f't{i}', seconds=0.01)
                    for i in range(100)]
            kills = 0
            while any(j.status not in TERMINAL_STATUSES for j in jobs):
                await asyncio.sleep(rng.uniform(0.05, 0.3))
                proc = m.worker_process
                if proc is not None and proc.is_alive() and kills < 4:
                    try: os.kill(proc.pid, signal.SIGKILL); kills += 1
                    except ProcessLookupError: pass
            await asyncio.sleep(0.1)
            ends = {}
            for e, d in events.events:
                if e.split(':')[1] in TERMINAL_STATUSES: ends[d['job_id']] = ends.get(d['job_id'], 0) + 1
            assert all(ends.get(j.id) == 1 for j in jobs), "a job ended more or less than once"
            for j in jobs:
                if j.status == 'completed': assert j.result['text'] == j.params['text']
                else: assert j.status == 'failed' and 'Worker died' in j.error, j.error
            assert kills >= 2 and sum(j.status == 'completed' for j in jobs) > 80
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

# ----- placement, and the actor's own death ----------------------------------------------------------------------
def test_gpu_placement_in_events_and_workers_info(nothing_left):
    "Two workers with a GPU each: Ray picks them, the worker sees its own, events and rows say which."
    async def main():
        m, events = make(max_workers=2, ray_actor_options={'num_gpus': 1})
        try:
            await m.start()
            jobs = [await m.start_job('env', keys=['CUDA_VISIBLE_DEVICES']) for _ in range(4)]
            done = [await finish(m, j) for j in jobs]
            rows = m.get_workers_info()
            node = ray.get_runtime_context().get_node_id()
            assert [r['node'] for r in rows] == [node, node]
            assert sorted(g for r in rows for g in r['gpu']) == [0, 1]
            assert ray.available_resources().get('GPU', 0) == 0  # both held by the two actors
            await asyncio.sleep(0.05)
            started = {d['job_id']: d for e, d in events.events if e == 'text:started'}
            for j in done:
                assert started[j.id]['node'] == node and len(started[j.id]['gpu']) == 1
                assert j.result['env']['CUDA_VISIBLE_DEVICES'] == str(started[j.id]['gpu'][0])
        finally: m.shutdown()
    run(main())

@pytest.mark.parametrize('policy', [RestartPolicy.ALWAYS, RestartPolicy.ON_CANCELLATION])
def test_actor_death_fails_only_the_running_job(nothing_left, tmp_path, policy):
    "ray.kill of the host actor: its running job fails saying why, its tree ends, the slot restarts by policy."
    async def main():
        m, events = make(policy)
        try:
            pid_file = tmp_path / 'child.pid'
            running = await m.start_job('spawn', pid_file=str(pid_file))
            behind = await m.start_job('echo', text='behind')
            await until(lambda: running.status == 'running' and pid_file.exists() and pid_file.read_text())
            pid, grandchild = m.worker_process.pid, int(pid_file.read_text())
            ray.kill(host_of(m))
            running = await finish(m, running)
            assert running.status == 'failed' and 'Worker died' in running.error and 'SIGKILL' in running.error
            assert pid_gone(pid) and pid_gone(grandchild)
            behind = await finish(m, behind)
            if policy == RestartPolicy.ALWAYS:
                assert behind.status == 'completed' and behind.worker_pid != pid and m.restart_count == 1
            else:
                assert behind.status == 'failed' and 'not restarted' in behind.error, behind.error
            await asyncio.sleep(0.05)
            died = [d for e, d in events.events if e == 'text:worker_died']
            assert len(died) == 1 and died[0]['job_id'] == running.id and died[0]['pid'] == pid
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

def test_actor_death_reason_is_logged(nothing_left, caplog):
    "What Ray said of the actor's death reaches the app's log, as the worker's last error."
    async def main():
        m, _ = make()
        try:
            await m.start()
            ray.kill(host_of(m))
            await until(lambda: m.get_workers_info()[0]['state'] == 'not started')
            assert 'the Ray actor hosting the worker died' in caplog.text and 'ray.kill' in caplog.text
        finally: m.shutdown()
    run(main())

def test_a_worker_waiting_for_a_node_holds_up_no_other(nothing_left):
    """Three workers asking a GPU each of two: the third waits for a node (30 s at most) while the other two run jobs,
    a cancel is handled meanwhile, and shutdown ends the waiting actor."""
    async def main():
        m, _ = make(max_workers=3, ray_actor_options={'num_gpus': 1})
        try:
            jobs = [await m.start_job('echo', text=f'j{i}') for i in range(6)]
            done = [await finish(m, j, 30) for j in jobs]  # the 60 s wait for a node held them all before
            assert [(j.status, j.result['text']) for j in done] == [('completed', f'j{i}') for i in range(6)]
            hang = await m.start_job('hang')
            await until(lambda: hang.status == 'running', 20)
            assert await m.cancel_job(hang.id)
            assert (await finish(m, hang, 20)).status == 'cancelled'
            assert (await finish(m, await m.start_job('echo', text='after'), 30)).status == 'completed'
            # the cancelled worker's replacement, or the waiting one, took the freed GPU: one slot waits, whichever
            def waiting(): return [r['worker_id'] for r in m.get_workers_info() if r['state'] in ('starting', 'restarting')]
            await until(lambda: len(waiting()) == 1, 20)
            assert len(live_hosts()) == 3
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

def test_the_wait_for_a_node_is_bounded_by_the_start_timeout(nothing_left, caplog):
    "`worker_start_timeout_seconds` bounds it: the waiting worker's start fails saying why; the others go on."
    async def main():
        m, _ = make(max_workers=3, ray_actor_options={'num_gpus': 1}, worker_start_timeout_seconds=10)
        try:
            done = [await finish(m, await m.start_job('echo', text=str(i)), 30) for i in range(3)]
            assert [j.status for j in done] == ['completed'] * 3
            await until(lambda: [r["state"] for r in m.get_workers_info()].count("not started") == 1, 30)
            assert "did not place its actor ({'num_gpus': 1" in caplog.text and 'within 10 s' in caplog.text
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

def test_unplaceable_actor_is_a_clear_error(nothing_left):
    "More GPUs than the cluster has: start() fails after its timeout saying what was asked, and leaves no actor."
    w = RayWorker(scenario_worker_process, 'unplaceable', actor_options={'num_gpus': 3}, start_timeout=1)
    with pytest.raises(TimeoutError, match=r"did not place its actor \({'num_gpus': 3"): w.start()
    assert w.actor is None and w.fds() == [] and w.stop(graceful=False, timeout=0) is None
    w.close()
