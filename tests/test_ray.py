"The Ray backend (issue 12): what only it has; the manager's matrix runs on it in tests/test_manager.py."
import asyncio, functools, os, subprocess, sys, textwrap, time, uuid

import psutil, pytest

ray = pytest.importorskip('ray', reason="the Ray backend needs ray: pip install -e '.[ray]'")

import cjm_fasthtml_workers.backends.ray as ray_backend
from cjm_fasthtml_workers.backends.ray import RayWorker
from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
from cjm_fasthtml_workers.testing import closing_worker_process, raw_writer_process, scenario_worker_process
from conftest import RAY_MARK_ENV, assert_nothing_left_on_ray, live_hosts, pid_gone
from helpers import TextJobManager, assert_terminal, finish, make, run, until

# ----- one local Ray instance for the module (conftest's); nothing of ours outlives a test ------------------
@pytest.fixture(scope='module', autouse=True)
def _ray(ray_instance): return ray_instance

@pytest.fixture
def nothing_left(ray_instance):
    ("Every test ends with no host actor, no worker process (nor anything a worker started) and every GPU "
     "free.")
    yield
    assert_nothing_left_on_ray(ray_instance)

RAY = dict(backend='ray')  # what every manager here is given

def host_of(m):
    "The first worker's host actor."
    return m._supervisor.slots[0].worker.transport.actor

# The manager's matrix (lifecycle, cancel pending and running, crashes under each policy, timeout, streaming,
# progress, reload and unload, shutdown, the soak with random kills, the loop never waiting) runs on this
# backend too: the tests of tests/test_manager.py that take the `backend` fixture (conftest). Here: what only
# the Ray backend has.

# ----- streaming, progress, plugin commands -----------------------------------------------------------------
def test_flood_of_chunks_arrives_whole_and_in_order(nothing_left, monkeypatch):
    ("20000 chunks as fast as the worker makes them, the relay held back past 8 unread: "
     "none lost or reordered.")
    monkeypatch.setattr(ray_backend, '_HIGH_WATER', 8)  # the supervisor lags all the time
    async def main():
        m, _ = make(**RAY)
        try:
            text = ' '.join(f'w{i}' for i in range(20000))
            job = await finish(m, await m.start_job('stream', text=text, stream=True), timeout=60)
            assert job.status == 'completed' and ''.join(m.get_job_chunks(job.id)) == text
            assert (await finish(m, await m.start_job('echo', text='after'))).status == 'completed'
        finally: m.shutdown()
    run(main(), 110)  # its waits add up to more than run's default

# ----- what a worker writes: unreadable objects, garbage, closed pipes --------------------------------------
def test_unreadable_result_fails_only_its_job(nothing_left):
    ("An object only the worker can rebuild crosses the actor as bytes: "
     "its job fails saying so, the worker goes on.")
    async def main():
        m, _ = make(**RAY)
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

# ----- shutdown ---------------------------------------------------------------------------------------------
def test_interpreter_exit_with_ray_started_by_the_manager(nothing_left, tmp_path):
    ("An app that lets the manager start Ray, and exits without shutdown(): "
     "one exit, prompt, and nothing left.")
    mark = uuid.uuid4().hex
    script = tmp_path / 'app.py'
    script.write_text(textwrap.dedent('''
        import asyncio, sys
        sys.path.insert(0, %r)
        from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
        from helpers import TextJobManager
        async def main():
            options = dict(num_cpus=1, include_dashboard=False, _node_ip_address='127.0.0.1',
                           runtime_env={'env_vars': {%r: %r}})
            m = TextJobManager('text', 'test', worker_config=WorkerConfig(
                backend='ray', restart_policy=RestartPolicy.ALWAYS, ray_init_options=options))
            job = await m.start_job('hang')
            while job.status != 'running': await asyncio.sleep(0.01)
            print(m.worker_process.pid, flush=True)
        if __name__ == '__main__': asyncio.run(main())
    ''' % (os.path.dirname(__file__), RAY_MARK_ENV, mark)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pid = int(proc.stdout.readline())
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - t0 < 10, "the app took too long to exit"
    # a restart at exit starts no second one
    assert err.count('Started a local Ray instance') == 1, err[-3000:]
    assert pid_gone(pid)
    def theirs(p):
        try: return p.environ().get(RAY_MARK_ENV) == mark
        except (psutil.Error, OSError): return False
    deadline = time.monotonic() + 10
    while (left := [p.pid for p in psutil.process_iter() if theirs(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"the app's Ray left processes behind: {left}"

# ----- placement, and the actor's own death -----------------------------------------------------------------
def test_gpu_placement_in_events_and_workers_info(nothing_left):
    "Two workers with a GPU each: Ray picks them, the worker sees its own, events and rows say which."
    async def main():
        m, events = make(2, ray_actor_options={'num_gpus': 1}, **RAY)
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
    ("ray.kill of the host actor: its running job fails saying why, its tree ends, "
     "the slot restarts by policy.")
    async def main():
        m, events = make(policy=policy, **RAY)
        try:
            pid_file = tmp_path / 'child.pid'
            running = await m.start_job('spawn', pid_file=str(pid_file))
            behind = await m.start_job('echo', text='behind')
            await until("the spawn job runs and wrote its child's pid",
                        lambda: running.status == 'running' and pid_file.exists() and pid_file.read_text())
            pid, grandchild = m.worker_process.pid, int(pid_file.read_text())
            ray.kill(host_of(m))
            running = await finish(m, running)
            assert (running.status == 'failed' and 'Worker died' in running.error
                    and 'SIGKILL' in running.error)
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
        m, _ = make(**RAY)
        try:
            await m.start()
            ray.kill(host_of(m))
            await until('the worker not started', lambda: m.get_workers_info()[0]['state'] == 'not started')
            assert 'the Ray actor hosting the worker died' in caplog.text and 'ray.kill' in caplog.text
        finally: m.shutdown()
    run(main())

def test_a_worker_waiting_for_a_node_holds_up_no_other(nothing_left):
    """Three workers asking a GPU each of two: the third waits for a node (30 s at most) while the other two
    run jobs, a cancel is handled meanwhile, and shutdown ends the waiting actor."""
    async def main():
        m, _ = make(3, ray_actor_options={'num_gpus': 1}, **RAY)
        try:
            jobs = [await m.start_job('echo', text=f'j{i}') for i in range(6)]
            done = [await finish(m, j, 30) for j in jobs]  # the 60 s wait for a node held them all before
            assert [(j.status, j.result['text']) for j in done] == [('completed', f'j{i}') for i in range(6)]
            hang = await m.start_job('hang')
            await until('the hang job runs', lambda: hang.status == 'running', 20)
            assert await m.cancel_job(hang.id)
            assert (await finish(m, hang, 20)).status == 'cancelled'
            assert (await finish(m, await m.start_job('echo', text='after'), 30)).status == 'completed'
            # the cancelled worker's replacement, or the waiting one, took the freed GPU: one slot waits,
            # whichever
            def waiting(): return [r['worker_id'] for r in m.get_workers_info()
                                   if r['state'] in ('starting', 'restarting')]
            await until('one worker waiting', lambda: len(waiting()) == 1, 20)
            assert len(live_hosts()) == 3
        finally: m.shutdown()
        assert_terminal(m)
    run(main(), 110)  # its waits add up to more than run's default

def test_the_wait_for_a_node_is_bounded_by_the_start_timeout(nothing_left, caplog):
    "`worker_start_timeout_seconds` bounds it: the waiting worker's start fails saying why; the others go on."
    async def main():
        m, _ = make(3, ray_actor_options={'num_gpus': 1}, worker_start_timeout_seconds=10, **RAY)
        try:
            done = [await finish(m, await m.start_job('echo', text=str(i)), 30) for i in range(3)]
            assert [j.status for j in done] == ['completed'] * 3
            await until('one worker not started',
                        lambda: [r['state'] for r in m.get_workers_info()].count('not started') == 1, 30)
            assert "did not place its actor ({'num_gpus': 1" in caplog.text and 'within 10 s' in caplog.text
        finally: m.shutdown()
        assert_terminal(m)
    run(main(), 110)  # its waits add up to more than run's default

def test_unplaceable_actor_is_a_clear_error(nothing_left):
    ("More GPUs than the cluster has: start() fails after its timeout saying what was asked, "
     "and leaves no actor.")
    w = RayWorker(scenario_worker_process, 'unplaceable', actor_options={'num_gpus': 3}, start_timeout=1)
    with pytest.raises(TimeoutError, match=r"did not place its actor \({'num_gpus': 3"): w.start()
    assert w.actor is None and w.fds() == [] and w.stop(graceful=False, timeout=0) is None
    w.close()
