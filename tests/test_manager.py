"BaseJobManager under failure: crashes, cancellation, timeouts, restart policies, shutdown, soak."
import asyncio, os, random, signal, subprocess, sys, textwrap, threading, time

import psutil, pytest

from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
from cjm_fasthtml_workers.managers.base import TERMINAL_STATUSES
from conftest import pid_gone
from helpers import RecordingResourceManager, TextJobManager, assert_terminal, finish, make, run, until

# ----- happy path -------------------------------------------------------------------------------------------
def test_many_jobs_in_order(no_leftover_processes, backend):
    async def main():
        m, events = make(backend=backend)
        try:
            jobs = [await m.start_job('echo', text=f'job {i}') for i in range(60)]
            done = [await finish(m, j) for j in jobs]
            assert [j.result['text'] for j in done] == [f'job {i}' for i in range(60)]
            assert all(j.status == 'completed' and j.started_at and j.worker_pid for j in done)
            ends = [j.completed_at for j in done]
            assert ends == sorted(ends)
            await asyncio.sleep(0.05)
            assert all(events.of(j.id) == ['submitted', 'started', 'completed'] for j in jobs)
            assert events.threads == {threading.get_ident()}  # delivered on the loop's thread
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

def test_pending_until_started_then_running(manager_factory, backend):
    async def main():
        m, _ = manager_factory(backend=backend)
        await m.start()
        slow = await m.start_job('sleep', seconds=0.6)
        behind = await m.start_job('echo', text='b')
        await until('the slow job runs', lambda: slow.status == 'running')
        assert behind.status == 'pending' and behind.started_at is None
        assert m.get_worker_info()['pending_jobs'] == 1
        assert (await finish(m, behind)).status == 'completed'
        assert slow.completed_at <= behind.started_at
    run(main())

# ----- cancellation -----------------------------------------------------------------------------------------
def test_cancel_pending_leaves_worker(manager_factory, backend):
    async def main():
        m, events = manager_factory(backend=backend)
        await m.start()
        pid = m.worker_process.pid
        slow = await m.start_job('sleep', seconds=0.3)
        victim = await m.start_job('echo', text='x')
        after = await m.start_job('echo', text='y')
        assert await m.cancel_job(victim.id)
        assert (await finish(m, after)).result['text'] == 'y'
        assert victim.status == 'cancelled' and victim.started_at is None and victim.completed_at
        assert slow.status == 'completed' and m.worker_process.pid == pid and m.restart_count == 0
        assert not await m.cancel_job(victim.id) and not await m.cancel_job(after.id)
        await asyncio.sleep(0.05)
        assert events.of(victim.id) == ['submitted', 'cancelled']
    run(main())

def test_cancel_running_keeps_waiting_jobs_in_order(no_leftover_processes, backend):
    async def main():
        m, events = make(backend=backend)
        try:
            await m.start()
            pid = m.worker_process.pid
            hang = await m.start_job('hang')
            behind = [await m.start_job('echo', text=str(i)) for i in range(5)]
            await until('the hang job runs', lambda: hang.status == 'running')
            assert await m.cancel_job(hang.id)
            done = [await finish(m, j) for j in behind]
            assert [j.result['text'] for j in done] == [str(i) for i in range(5)]
            assert [j.started_at for j in done] == sorted(j.started_at for j in done)
            assert hang.status == 'cancelled' and hang.error is None
            assert pid_gone(pid) and m.worker_process.pid != pid and m.restart_count == 1
            await asyncio.sleep(0.05)
            assert 'worker_restarted' in events.kinds()
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

def test_cancel_kills_grandchildren(manager_factory, tmp_path, backend):
    async def main():
        m, _ = manager_factory(backend=backend)
        pid_file = tmp_path / 'child.pid'
        job = await m.start_job('spawn', pid_file=str(pid_file))
        await until("the plugin wrote its child's pid", lambda: pid_file.exists() and pid_file.read_text())
        grandchild = int(pid_file.read_text())
        assert psutil.pid_exists(grandchild)
        assert await m.cancel_job(job.id)
        assert pid_gone(grandchild), "the plugin's own subprocess outlived the cancellation"
        assert (await finish(m, await m.start_job('echo', text='ok'))).status == 'completed'
    run(main())

# ----- crashes under every restart policy -------------------------------------------------------------------
CRASHES = {'kill': ({}, 'SIGKILL'), 'segv': ({}, 'SIGSEGV'), 'exit': ({'code': 3}, 'exited with code 3')}

@pytest.mark.parametrize('policy', list(RestartPolicy))
@pytest.mark.parametrize('crash', list(CRASHES))
def test_crash_matrix(no_leftover_processes, crash, policy, backend):
    async def main():
        m, events = make(policy=policy, restart_backoff_base_seconds=0.1, backend=backend)
        try:
            await m.start()
            pid = m.worker_process.pid
            params, reason = CRASHES[crash]
            # keeps the worker busy while the next two are queued
            first = await m.start_job('sleep', seconds=0.3)
            bad = await m.start_job(crash, **params)
            behind = await m.start_job('echo', text='behind')
            assert (await finish(m, first)).status == 'completed'
            bad = await finish(m, bad)
            assert bad.status == 'failed' and reason in bad.error, bad.error
            assert bad.started_at and bad.worker_pid == pid
            behind = await finish(m, behind)
            if policy in (RestartPolicy.ALWAYS, RestartPolicy.BACKOFF):
                assert behind.status == 'completed' and behind.worker_pid != pid and m.restart_count == 1
            else:
                assert behind.status == 'failed' and 'not restarted' in behind.error, behind.error
                assert m.worker_process is None and m.restart_count == 0
            assert pid_gone(pid)
            again = await finish(m, await m.start_job('echo', text='again'))  # lazy start when none runs
            assert again.status == 'completed'
            await asyncio.sleep(0.05)
            died = [d for e, d in events.events if e == 'text:worker_died']
            assert died[0]['job_id'] == bad.id and died[0]['pid'] == pid and reason in died[0]['reason']
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

def test_restart_budget_and_its_reset(manager_factory):
    async def main():
        m, _ = manager_factory(policy=RestartPolicy.ALWAYS, max_restart_attempts=2)
        # a completed job between crashes resets the count: 3 crashes, all restarted
        for _ in range(3):
            assert (await finish(m, await m.start_job('kill'))).status == 'failed'
            assert (await finish(m, await m.start_job('echo', text='ok'))).status == 'completed'
        assert m.restart_count == 3
        # three crashes in a row: the third is not restarted, and the job waiting behind it fails saying so
        jobs = [await m.start_job('kill') for _ in range(3)] + [await m.start_job('echo', text='late')]
        done = [await finish(m, j) for j in jobs]
        assert [j.status for j in done] == ['failed'] * 4
        assert 'gave up after 2 consecutive restarts' in done[3].error, done[3].error
    run(main())

def test_backoff_waits_on_a_timer(manager_factory):
    async def main():
        m, events = manager_factory(policy=RestartPolicy.BACKOFF, restart_backoff_base_seconds=1.0)
        await m.start()
        await finish(m, await m.start_job('kill'))
        info = m.get_worker_info()
        assert info['state'] == 'restarting' and info['pid'] is None
        t0 = time.monotonic()
        ticks = 0
        while m.get_worker_info()['state'] == 'restarting':  # the loop keeps running meanwhile
            await asyncio.sleep(0.01); ticks += 1
        assert ticks >= 10 and time.monotonic() - t0 >= 0.2
        assert (await finish(m, await m.start_job('echo', text='x'))).status == 'completed'
    run(main())

def test_job_timeout(manager_factory, tmp_path, backend):
    async def main():
        m, _ = manager_factory(job_timeout_seconds=0.5, backend=backend)
        pid_file = tmp_path / 'child.pid'
        hung = await m.start_job('spawn', pid_file=str(pid_file))
        behind = await m.start_job('echo', text='next')
        hung = await finish(m, hung)
        assert hung.status == 'failed' and 'timed out after 0.5 s' in hung.error, hung.error
        assert pid_gone(int(pid_file.read_text()))
        assert (await finish(m, behind)).status == 'completed'
    run(main())

# ----- bad input -------------------------------------------------------------------------------------------
def test_bad_input(manager_factory):
    async def main():
        m, _ = manager_factory()
        with pytest.raises(ValueError, match='no-such'): await m.start_job('no-such')
        with pytest.raises(TypeError, match='cannot be sent'):
            await m.start_job('echo', text=threading.Lock())
        with pytest.raises(TypeError): await m.start_job('echo', fn=lambda: 1)
        assert m.get_all_jobs() == []
        pid = m.worker_process.pid
        job = await finish(m, await m.start_job('unpicklable'))
        assert job.status == 'failed' and 'pickle' in job.error
        assert (await finish(m, await m.start_job('echo', text='fine'))).status == 'completed'
        assert m.worker_process.pid == pid
        with pytest.raises(KeyError): await m.wait_for_job('nope')
        with pytest.raises(KeyError): [c async for c in m.stream_job('nope')]
    run(main())

class Registry:
    "A plugin registry whose ids differ from the worker's plugin names."
    def __init__(self): self.plugins = {'p-echo': {'id': 'p-echo', 'name': 'echo'},
                                        'p-hist': {'id': 'p-hist', 'name': 'history'}}
    def get_plugins_by_category(self, category): return list(self.plugins.values())
    def get_plugin(self, plugin_id): return self.plugins.get(plugin_id)
    def load_plugin_config(self, plugin_id): return {'prefix': '>> ',
                                                     'model_id': 'tiny-echo'} if plugin_id == 'p-echo' else {}

def test_registry_and_resource_manager_integration(no_leftover_processes):
    async def main():
        rm = RecordingResourceManager()
        m = TextJobManager('text', 'test', plugin_registry=Registry(), resource_manager=rm)
        try:
            with pytest.raises(ValueError, match='echo'): await m.start_job('echo')  # ids, not names
            job = await finish(m, await m.start_job('p-echo', text='hi'))
            assert job.result['text'] == '>> hi' and m.get_plugin_name('p-echo') == 'echo'
            pid = job.worker_pid
            await until('an idle update to the resource manager',
                        lambda: any(c[0] == 'update' and c[2].get('status') == 'idle' for c in rm.calls))
            assert rm.calls[0] == ('register', pid, 'text')
            running = next(c for c in rm.calls if c[0] == 'update' and c[2].get('status') == 'running')
            assert running[2]['job_id'] == job.id and running[2]['plugin_name'] == 'echo'
            assert running[2]['plugin_id'] == 'p-echo' and running[2]['loaded_plugin_resource'] == 'tiny-echo'
            idle = next(c for c in rm.calls if c[0] == 'update' and c[2].get('status') == 'idle')
            assert idle[2]['job_id'] is None
        finally: m.shutdown()
        assert ('unregister', pid) in rm.calls
    run(main())

# ----- plugin commands -------------------------------------------------------------------------------------
def test_reload_and_unload(manager_factory, backend):
    async def main():
        m, _ = manager_factory(reload_timeout_seconds=0.3, backend=backend)
        assert await m.reload_plugin('echo', {'prefix': 'A:'})
        assert (await finish(m, await m.start_job('echo', text='1'))).result['text'] == 'A:1'
        assert not await m.reload_plugin('echo', {'fail_load': True})
        assert not await m.reload_plugin('echo', {'prefix': 'B:', 'load_seconds': 1.0})  # times out
        m.worker_config.reload_timeout_seconds = 10
        assert await m.reload_plugin('echo', {'prefix': 'C:'})  # not fooled by the late answer
        assert (await finish(m, await m.start_job('echo', text='2'))).result['text'] == 'C:2'
        assert await m.unload_plugin('echo')
        hist = await finish(m, await m.start_job('history'))
        assert hist.result['events'][-2:] == ['unload echo', 'load history']
        assert m.get_worker_info()['loaded_plugin'] == 'history'
        # a restarted worker keeps the reloaded configuration
        job = await m.start_job('hang')
        await until('the job runs', lambda: job.status == 'running')
        await m.cancel_job(job.id)
        assert (await finish(m, await m.start_job('echo', text='3'))).result['text'] == 'C:3'
    run(main())

# ----- streaming, progress, events --------------------------------------------------------------------------
def test_streaming_arrives_while_running(manager_factory, backend):
    async def main():
        m, events = manager_factory(backend=backend)
        job = await m.start_job('stream', text='a b c d e', delay=0.1, stream=True)
        seen = []
        async for chunk in m.stream_job(job.id):
            seen.append((chunk, job.status))
        assert [c for c, _ in seen] == ['a ', 'b ', 'c ', 'd ', 'e']
        assert seen[0][1] == 'running'  # the first chunk came before the job ended
        assert (await finish(m, job)).result == {'streamed': True}  # the documented result of a streamed job
        assert ''.join(m.get_job_chunks(job.id)) == 'a b c d e'
        await asyncio.sleep(0.05)
        assert events.of(job.id) == ['submitted', 'started'] + ['chunk'] * 5 + ['completed']
        # the same plugin without stream=True runs execute_plugin: no chunks, the text in the result
        plain = await finish(m, await m.start_job('stream', text='x y'))
        assert plain.result['text'] == 'x y' and m.get_job_chunks(plain.id) == []
        assert 'chunk' not in events.of(plain.id)
    run(main())

def test_progress(manager_factory, backend):
    async def main():
        m, events = manager_factory(backend=backend)
        job = await m.start_job('sleep', seconds=0.4, steps=4)
        await until('a progress report', lambda: job.progress is not None)
        assert 0 < job.progress < 1 or job.status != 'running'
        job = await finish(m, job)
        assert (job.progress, job.progress_message) == (1.0, 'step 4 of 4')
        await asyncio.sleep(0.05)
        assert events.of(job.id) == ['submitted', 'started'] + ['progress'] * 4 + ['completed']
        assert [d['progress'] for e, d in events.events if e == 'text:progress'] == [0.25, 0.5, 0.75, 1.0]
    run(main())

# ----- shutdown --------------------------------------------------------------------------------------------
def test_shutdown_with_work_in_flight(no_leftover_processes, tmp_path, backend):
    async def main():
        rm = RecordingResourceManager()
        m, events = make(backend=backend)
        m.resource_manager = rm
        pid_file = tmp_path / 'child.pid'
        running = await m.start_job('spawn', pid_file=str(pid_file))
        waiting = [await m.start_job('echo', text=str(i)) for i in range(3)]
        await until("the spawn job runs and wrote its child's pid",
                    lambda: running.status == 'running' and pid_file.exists() and pid_file.read_text())
        pid, grandchild = m.worker_process.pid, int(pid_file.read_text())
        t0 = time.monotonic()
        m.shutdown()
        m.shutdown()
        assert time.monotonic() - t0 < m.worker_config.shutdown_timeout_seconds + 3
        assert all(j.status == 'cancelled' and j.completed_at for j in [running] + waiting)
        assert pid_gone(pid) and pid_gone(grandchild)
        assert ('unregister', pid) in rm.calls
        with pytest.raises(RuntimeError, match='shut down'): await m.start_job('echo')
        await asyncio.sleep(0.05)
        assert events.of(running.id)[-1] == 'cancelled'
    run(main())

def test_shutdown_idle_is_graceful(no_leftover_processes, backend):
    async def main():
        m, _ = make(backend=backend)
        await m.start()
        proc = m.worker_process
        m.shutdown()
        assert proc.exitcode == 0  # STOP answered, not terminated
    run(main())

def test_interpreter_exit_shuts_down(no_leftover_processes, tmp_path):
    "A script that never calls shutdown() still exits promptly and leaves no worker."
    script = tmp_path / 'app.py'
    script.write_text(textwrap.dedent('''
        import asyncio, sys, uuid
        sys.path.insert(0, %r)
        from helpers import TextJobManager
        async def main():
            m = TextJobManager('text', 'test')
            job = await m.start_job('hang')
            while job.status != 'running': await asyncio.sleep(0.01)
            print(m.worker_process.pid, flush=True)
        if __name__ == '__main__': asyncio.run(main())
    ''' % os.path.dirname(__file__)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 'leaked' not in proc.stderr, proc.stderr
    assert pid_gone(int(proc.stdout.split()[0]))

# ----- soak and event loop ---------------------------------------------------------------------------------
def test_soak_random_kills(no_leftover_processes, backend):
    "Hundreds of jobs while the worker is killed at random: every job ends exactly once, results are right."
    async def main():
        m, events = make(policy=RestartPolicy.ALWAYS, max_restart_attempts=1000, backend=backend)
        rng = random.Random(1234)
        try:
            jobs = [await m.start_job(rng.choice(['echo', 'echo', 'sleep']), text=f't{i}', seconds=0.002)
                    for i in range(400)]
            kills = 0
            while any(j.status not in TERMINAL_STATUSES for j in jobs):
                await asyncio.sleep(rng.uniform(0.01, 0.15))
                proc = m.worker_process
                if proc is not None and kills < 15:
                    try: os.kill(proc.pid, signal.SIGKILL); kills += 1
                    except ProcessLookupError: pass
                    for j in jobs: assert not (j.status == 'completed' and j.result is None)
            await asyncio.sleep(0.1)
            ends = {}
            for e, d in events.events:
                if e.split(':')[1] in TERMINAL_STATUSES: ends[d['job_id']] = ends.get(d['job_id'], 0) + 1
            assert all(ends.get(j.id) == 1 for j in jobs), "a job ended more or less than once"
            for j in jobs:
                if j.status == 'completed': assert j.result['text'] == j.params['text']
                else: assert j.status == 'failed' and 'Worker died' in j.error, j.error
            assert kills >= 5 and sum(j.status == 'completed' for j in jobs) > 300
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

def test_event_loop_never_stalls(no_leftover_processes, backend):
    "A 1 ms ticker keeps ticking through submissions, a cancel, a reload and an unload."
    async def main():
        m, _ = make(backend=backend)
        stalls, stop = [], False
        async def ticker():
            last = time.perf_counter()
            while not stop:
                await asyncio.sleep(0.001)
                now = time.perf_counter(); stalls.append(now - last); last = now
        try:
            await m.start()
            t = asyncio.create_task(ticker())
            jobs = [await m.start_job('echo', text=str(i)) for i in range(300)]
            hang = await m.start_job('hang')
            await until('the hang job runs', lambda: hang.status == 'running')
            await m.cancel_job(hang.id)
            assert await m.reload_plugin('echo', {'prefix': '>'})
            assert await m.unload_plugin('echo')
            for j in jobs: await finish(m, j)
            stop = True; await t
        finally: m.shutdown()
        worst = max(stalls) - 0.001
        print(f"longest event-loop stall: {worst * 1000:.1f} ms over {len(stalls)} ticks")
        assert worst < 0.1, f"event loop stalled for {worst * 1000:.0f} ms"
    run(main())

# ----- hooks ------------------------------------------------------------------------------------------------
class HookedManager(TextJobManager):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.completed_hook = []
    async def _validate_resources(self, plugin_id, plugin_config):
        return "GPU is busy" if plugin_id == 'sleep' else None
    def _on_job_completed(self, job_id):
        self.completed_hook.append((job_id, self.get_job(job_id).status))
    def extract_job_result(self, job, result_data):
        if result_data.get('text') == 'explode': raise KeyError('no such field')
        return result_data

def test_hooks(no_leftover_processes):
    async def main():
        m = HookedManager('text', 'test')
        try:
            with pytest.raises(RuntimeError, match='^Resource validation failed: GPU is busy$'):
                await m.start_job('sleep', seconds=1)
            assert m.get_all_jobs() == []  # a refused job is not kept
            ok = await finish(m, await m.start_job('echo', text='fine'))
            bad = await finish(m, await m.start_job('echo', text='explode'))
            assert bad.status == 'failed' and 'extract_job_result failed: KeyError' in bad.error
            await until('_on_job_completed called', lambda: len(m.completed_hook) == 1)
            assert m.completed_hook == [(ok.id, 'completed')]  # called once, after the status is set
        finally: m.shutdown()
    run(main())

def test_many_waiters_one_result(manager_factory):
    async def main():
        m, _ = manager_factory()
        job = await m.start_job('sleep', seconds=0.2, text='shared')
        done = await asyncio.gather(*[m.wait_for_job(job.id, timeout=30) for _ in range(10)])
        assert all(d is job and d.status == 'completed' and d.result['text'] == 'shared' for d in done)
        assert m._book.waiters == {}  # nothing left behind
    run(main())

# ----- a worker that cannot start ---------------------------------------------------------------------------
class BrokenManager(TextJobManager):
    def get_worker_entry_point(self):
        from cjm_fasthtml_workers.testing import failing_init_worker_process
        return failing_init_worker_process

@pytest.mark.parametrize('policy', [RestartPolicy.ON_CANCELLATION, RestartPolicy.ALWAYS])
def test_worker_that_dies_in_its_loop(no_leftover_processes, policy):
    ("An exception in the worker's loop kills it: start() and start_job fail clearly, "
     "and restarts stop at the budget.")
    async def main():
        m = BrokenManager('text', 'test',
                          worker_config=WorkerConfig(restart_policy=policy, max_restart_attempts=2))
        try:
            with pytest.raises(RuntimeError, match='plugin manager could not be created'): await m.start()
            assert m.restart_count == (2 if policy == RestartPolicy.ALWAYS else 0)
            assert m.get_worker_info()['state'] == 'not started'
            with pytest.raises(RuntimeError, match='exited with code 1'): await m.start_job('echo')
        finally: m.shutdown()
    run(main())

class UnspawnableManager(TextJobManager):
    def get_worker_entry_point(self): return lambda *queues: None  # spawn cannot pickle a lambda

def test_worker_that_cannot_be_spawned(no_leftover_processes, caplog):
    ("A spawn that fails in the parent fails start() and the waiting jobs with the reason, once, "
     "with no retry loop.")
    async def main():
        m = UnspawnableManager('text', 'test',
                               worker_config=WorkerConfig(restart_policy=RestartPolicy.ALWAYS))
        try:
            with pytest.raises(RuntimeError, match='Could not start a worker'): await m.start()
            await asyncio.sleep(0.2)
            assert sum('could not start a worker' in r.getMessage() for r in caplog.records) == 1
            with pytest.raises(RuntimeError, match='Could not start a worker'): await m.start()  # tries again
        finally: m.shutdown()
    run(main())

def test_dispatched_job_that_never_started_runs_on_the_next_worker(manager_factory):
    async def main():
        m, events = manager_factory(policy=RestartPolicy.ALWAYS)
        await m.start()
        pid = m.worker_process.pid
        os.kill(pid, signal.SIGSTOP)  # frozen: the job reaches its pipe but cannot start
        job = await m.start_job('echo', text='survivor')
        await asyncio.sleep(0.2)
        assert job.status == 'pending' and m.get_worker_info()['current_job_id'] == job.id
        os.kill(pid, signal.SIGKILL)
        job = await finish(m, job)
        assert job.status == 'completed' and job.result['text'] == 'survivor' and job.worker_pid != pid
        await asyncio.sleep(0.05)
        died = [d for e, d in events.events if e == 'text:worker_died']
        assert died and 'job_id' not in died[0]  # it was not running the job: a worker event, no job_id key
        restarted = [d for e, d in events.events if e == 'text:worker_restarted']
        assert restarted and all('job_id' not in d for d in restarted)
    run(main())
