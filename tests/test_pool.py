"""A pool of N workers: crashes and cancels stay on one worker, model affinity, reload across the pool, soak,
GPU placement, recycling, preloading, and N=1 as before.

Workers run `PoolPluginManager` (below): the scenario plugins plus two cheap ones, `alpha` and `beta`, and
`environ`, which reports the worker's environment. Every load of a plugin in any worker appends a line
`<pid> load|reload <name>` to the file named by $POOL_LOAD_LOG (set by the test before the manager starts;
spawned workers inherit os.environ), so that model loads can be counted across the pool."""
import asyncio, os, random, signal, time
from collections import Counter

import pytest

from cjm_fasthtml_workers.core.config import RestartPolicy
from cjm_fasthtml_workers.core.worker import base_worker_process
from cjm_fasthtml_workers.testing import PLUGIN_NAMES, ScenarioPluginManager
from cjm_fasthtml_workers.managers.base import TERMINAL_STATUSES
from conftest import pid_gone
from helpers import TextJobManager, assert_terminal, finish, make, of_kind, run, until

LOG_VAR = 'POOL_LOAD_LOG'
EXTRA_PLUGINS = ['alpha', 'beta', 'environ']
INFO_KEYS = {'worker_id', 'pid', 'alive', 'state', 'gpu', 'loaded_plugin', 'current_job_id', 'restart_count',
             'crashes', 'cancels', 'jobs_done', 'last_exit'}

# ----- what the workers run (module level: spawned workers import it by name) -------------------------------
class PoolPluginManager(ScenarioPluginManager):
    "The scenario plugins, `alpha`/`beta` (cheap, count their loads) and `environ`; every load is logged."
    def discover_plugins(self): return [{'name': n} for n in PLUGIN_NAMES + EXTRA_PLUGINS]

    def _log(self, kind, name):
        path = os.environ.get(LOG_VAR)
        if path:
            with open(path, 'a') as f: f.write(f"{os.getpid()} {kind} {name}\n")

    def load_plugin(self, plugin_data, config):
        super().load_plugin(plugin_data, config)
        self._log('load', plugin_data['name'])

    def reload_plugin(self, plugin_name, config=None):
        super().reload_plugin(plugin_name, config)
        if config is not None: self._log('reload', plugin_name)

    def execute_plugin(self, plugin_name, **params):
        if plugin_name in ('alpha', 'beta'):
            time.sleep(params.get('seconds', 0))
            prefix = self.configs.get(plugin_name, {}).get('prefix', '')
            return {'text': f"{prefix}{plugin_name}:{params.get('text', '')}", 'pid': os.getpid()}
        if plugin_name in ('echo', 'environ'): time.sleep(params.get('seconds', 0))  # to keep a worker busy
        if plugin_name == 'environ':
            return {'env': {k: os.environ.get(k) for k in params.get('keys', [])}, 'pid': os.getpid()}
        return super().execute_plugin(plugin_name, **params)

def pool_worker_process(request_queue, result_queue, response_queue):
    "Worker entry point running `PoolPluginManager` plugins."
    base_worker_process(request_queue, result_queue, response_queue, PoolPluginManager,
                        supports_streaming=True)

class PoolManager(TextJobManager):
    def get_worker_entry_point(self): return pool_worker_process

# ----- helpers ---------------------------------------------------------------------------------------------
def info(m): return m.get_workers_info()
def pids(m): return [r['pid'] for r in info(m)]
def row_of(m, pid): return next(r for r in info(m) if r['pid'] == pid)

def all_idle(m): return all(r['state'] == 'idle' and r['alive'] and r['pid'] for r in info(m))

def assert_str_job_ids(events):
    for e, d in events.events:
        if 'job_id' in d: assert isinstance(d['job_id'], str), (e, d)

@pytest.fixture
def load_log(tmp_path, monkeypatch):
    "Path of the load log the workers append to; call `loads(path)` for its lines as (pid, kind, name)."
    path = tmp_path / 'loads.log'
    monkeypatch.setenv(LOG_VAR, str(path))
    return path

def loads(path):
    if not path.exists(): return []
    return [(int(p), k, n)
            for p, k, n in (line.split() for line in path.read_text().splitlines() if line.strip())]

# ----- 1. crash matrix: one worker's crash stays with it ----------------------------------------------------
CRASHES = {'kill': ({}, 'SIGKILL'), 'segv': ({}, 'SIGSEGV'), 'exit': ({'code': 3}, 'exited with code 3')}

@pytest.mark.parametrize('crash', list(CRASHES))
def test_crash_matrix_pool(no_leftover_processes, crash):
    async def main():
        m, events = make(3, RestartPolicy.ALWAYS, cls=PoolManager)
        try:
            await m.start()
            rows = info(m)
            assert ([r['worker_id'] for r in rows] == [0, 1, 2]
                    and all(set(r) >= INFO_KEYS for r in rows)), rows
            assert all_idle(m), rows
            before = pids(m)
            params, reason = CRASHES[crash]
            long = [await m.start_job('sleep', seconds=2.0, text=t) for t in 'ab']
            await until('every long job runs', lambda: all(j.status == 'running' for j in long))
            bad = await m.start_job(crash, **params)
            behind = [await m.start_job('echo', text=f'w{i}') for i in range(4)]
            bad = await finish(m, bad)
            assert bad.status == 'failed' and reason in bad.error, bad.error
            # the others kept running
            assert all(j.status == 'running' for j in long), [j.status for j in long]
            # three jobs on three workers at once
            ran_on = [j.worker_pid for j in long] + [bad.worker_pid]
            assert len(set(ran_on)) == 3 and set(ran_on) == set(before), (ran_on, before)
            long = [await finish(m, j) for j in long]
            assert ([j.status for j in long] == ['completed'] * 2
                    and [j.result['text'] for j in long] == ['a', 'b'])
            done = [await finish(m, j) for j in behind]
            assert [j.status for j in done] == ['completed'] * 4, [(j.status, j.error) for j in done]
            assert [j.result['text'] for j in done] == [f'w{i}' for i in range(4)]
            assert pid_gone(bad.worker_pid)
            crashed = before.index(bad.worker_pid)
            await until('the crashed worker idle again', lambda: info(m)[crashed]['state'] == 'idle')
            after = info(m)
            for i, r in enumerate(after):
                if i == crashed:
                    assert (r['pid'] != before[i] and r['alive'] and r['restart_count'] == 1
                            and r['crashes'] == 1), r
                else:  # the other two workers were not touched
                    assert r['pid'] == before[i] and r['restart_count'] == 0 and r['crashes'] == 0, r
            await asyncio.sleep(0.05)
            died = of_kind(events, 'worker_died')
            assert len(died) == 1, died
            assert died[0]['worker_id'] == crashed and died[0]['pid'] == bad.worker_pid, died
            assert died[0]['job_id'] == bad.id and reason in died[0]['reason'], died
            restarted = of_kind(events, 'worker_restarted')
            assert len(restarted) == 1 and restarted[0]['worker_id'] == crashed, restarted
            assert (restarted[0]['pid'] == after[crashed]['pid']
                    and restarted[0]['restart_count'] == 1), restarted
            started = {d['job_id']: d for d in of_kind(events, 'started')}
            for j in long + [bad] + done:
                assert (started[j.id]['worker_pid'] == j.worker_pid
                        and started[j.id]['plugin_id'] == j.plugin_id)
                assert 'worker_id' in started[j.id] and 'gpu' not in started[j.id], started[j.id]
            assert started[bad.id]['worker_id'] == crashed
            assert_str_job_ids(events)
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

# ----- 2. cancel ends only that job's worker ----------------------------------------------------------------
def test_cancel_leaves_other_workers(no_leftover_processes, load_log):
    async def main():
        m, events = make(3, cls=PoolManager)
        try:
            await m.start()
            a = await m.start_job('alpha', seconds=0.6, text='1')
            b = await m.start_job('beta', seconds=0.6, text='2')
            hang = await m.start_job('hang')
            pending = await m.start_job('echo', text='never')  # all three are busy: it waits
            assert pending.status == 'pending' and all(r['current_job_id'] != pending.id for r in info(m))
            assert await m.cancel_job(pending.id)  # a cancelled pending job never runs
            assert pending.status == 'cancelled' and pending.started_at is None
            await until('the hang job runs', lambda: hang.status == 'running')
            a, b = await finish(m, a), await finish(m, b)
            assert (a.result['text'], b.result['text']) == ('alpha:1', 'beta:2')
            assert len({a.worker_pid, b.worker_pid, hang.worker_pid}) == 3
            before = info(m)
            holder = {r['loaded_plugin']: r['worker_id'] for r in before}
            assert {'alpha', 'beta'} <= set(holder), before
            victim = next(r for r in before if r['pid'] == hang.worker_pid)
            assert victim['state'] == 'busy' and victim['current_job_id'] == hang.id, victim
            assert await m.cancel_job(hang.id)
            assert pid_gone(hang.worker_pid), "the cancelled job's worker is still alive"
            await until('every worker idle', lambda: all_idle(m))
            after = info(m)
            for r0, r1 in zip(before, after):
                if r0['worker_id'] == victim['worker_id']:
                    assert r1['pid'] != r0['pid'] and r1['cancels'] == 1 and r1['restart_count'] == 1, r1
                    assert r1['crashes'] == 0 and r1['loaded_plugin'] != 'hang', r1
                else:
                    assert (r1['pid'], r1['loaded_plugin']) == (r0['pid'], r0['loaded_plugin']), (r0, r1)
                    assert r1['restart_count'] == 0 and r1['cancels'] == 0, r1
            # the untouched workers still hold their plugins: no new load
            a2, b2 = await m.start_job('alpha', text='3'), await m.start_job('beta', text='4')
            a2, b2 = await finish(m, a2), await finish(m, b2)
            assert (a2.worker_pid, b2.worker_pid) == (a.worker_pid, b.worker_pid)
            assert Counter(n for _, _, n in loads(load_log) if n in ('alpha', 'beta')) == {'alpha': 1,
                                                                                           'beta': 1}
            assert 'echo' not in [n for _, _, n in loads(load_log)]  # the cancelled pending job never ran
            await asyncio.sleep(0.05)
            assert events.of(pending.id) == ['submitted', 'cancelled']
            assert hang.status == 'cancelled' and hang.error is None
            died = of_kind(events, 'worker_died')
            assert (len(died) == 1 and died[0]['worker_id'] == victim['worker_id']
                    and died[0]['pid'] == hang.worker_pid)
            assert 'gpu' not in died[0] and 'exitcode' in died[0] and died[0]['reason'], died
            assert died[0].get('job_id') == hang.id, died  # it was running the (now cancelled) job
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

# ----- 3. model affinity ------------------------------------------------------------------------------------
def test_affinity_loads_each_plugin_once(no_leftover_processes, load_log):
    ("Alternating alpha/beta, two at a time on two workers: each goes to the worker that has it, "
     "one load each.")
    async def main():
        m, _ = make(2, cls=PoolManager)
        try:
            await m.start()
            jobs = []
            for i in range(50):
                pair = [await m.start_job('alpha', text=str(i)), await m.start_job('beta', text=str(i))]
                jobs += [await finish(m, j) for j in pair]
            assert [j.result['text'] for j in jobs] == [f'{p}:{i}' for i in range(50)
                                                        for p in ('alpha', 'beta')]
            assert all(j.status == 'completed' for j in jobs)
            lines = loads(load_log)
            assert Counter(n for _, _, n in lines) == {'alpha': 1, 'beta': 1}, lines
            by_plugin = {p: {j.worker_pid for j in jobs if j.plugin_id == p} for p in ('alpha', 'beta')}
            assert (all(len(s) == 1 for s in by_plugin.values())
                    and by_plugin['alpha'] != by_plugin['beta']), by_plugin
            assert sorted(r['loaded_plugin'] for r in info(m)) == ['alpha', 'beta']
            assert sum(r['jobs_done'] for r in info(m)) == 100
        finally: m.shutdown()
    run(main())

def test_affinity_prefers_an_empty_worker(no_leftover_processes, load_log):
    "A job whose plugin no free worker holds goes to an empty worker rather than evicting a loaded plugin."
    async def main():
        m, _ = make(3, cls=PoolManager)
        try:
            await m.start()
            a = await finish(m, await m.start_job('alpha', text='x'))
            b = await finish(m, await m.start_job('beta', text='y'))
            assert a.worker_pid != b.worker_pid  # beta did not evict alpha while a worker was empty
            e = await finish(m, await m.start_job('echo', text='z'))
            assert e.worker_pid not in (a.worker_pid, b.worker_pid)
            assert sorted(r['loaded_plugin'] for r in info(m)) == ['alpha', 'beta', 'echo']
            # nothing evicted
            assert Counter(n for _, _, n in loads(load_log)) == {'alpha': 1, 'beta': 1, 'echo': 1}
        finally: m.shutdown()
    run(main())

# ----- 4. reload and unload across the pool ---------------------------------------------------------------
def test_reload_reaches_every_holder(no_leftover_processes, load_log):
    async def main():
        m, _ = make(2, cls=PoolManager)
        try:
            await m.start()
            first = [await m.start_job('echo', text=str(i), seconds=0.3) for i in range(2)]  # one per worker
            first = [await finish(m, j) for j in first]
            assert len({j.worker_pid for j in first}) == 2
            assert [r['loaded_plugin'] for r in info(m)] == ['echo', 'echo']
            assert await m.reload_plugin('echo', {'prefix': 'R:'})
            lines = loads(load_log)
            assert {p for p, k, n in lines if (k, n) == ('reload', 'echo')} == set(pids(m)), lines
            later = [await m.start_job('echo', text=str(i), seconds=0.2) for i in range(4)]
            later = [await finish(m, j) for j in later]
            assert [j.result['text'] for j in later] == [f'R:{i}' for i in range(4)]
            assert {j.worker_pid for j in later} == set(pids(m))  # both workers give the new prefix
            assert not await m.reload_plugin('echo', {'fail_load': True})
            assert await m.reload_plugin('echo', {'prefix': 'S:'})
            again = [await m.start_job('echo', text=str(i), seconds=0.2) for i in range(2)]
            again = [await finish(m, j) for j in again]
            assert ([j.result['text'] for j in again] == ['S:0', 'S:1']
                    and len({j.worker_pid for j in again}) == 2)
            assert set(pids(m)) == {j.worker_pid for j in first}  # nobody was restarted for it
        finally: m.shutdown()
    run(main())

def test_reload_busy_holder_no_holder_and_unload(no_leftover_processes, load_log):
    async def main():
        m, _ = make(2, cls=PoolManager)
        try:
            await m.start()
            # with no holder, reload loads it in one worker
            assert await m.reload_plugin('beta', {'prefix': 'Q:'})
            assert sorted(str(r['loaded_plugin']) for r in info(m)) == ['None', 'beta']
            b = await finish(m, await m.start_job('beta', text='1'))
            assert b.result['text'] == 'Q:beta:1' and row_of(m, b.worker_pid)['loaded_plugin'] == 'beta'
            assert [n for _, _, n in loads(load_log)] == ['beta']  # that job did not load it again
            # alpha on both workers; one of them busy when the reload comes: it gets it after its job
            both = [await m.start_job('alpha', text='0', seconds=0.3) for _ in range(2)]
            both = [await finish(m, j) for j in both]
            assert [r['loaded_plugin'] for r in info(m)] == ['alpha', 'alpha']
            slow = await m.start_job('alpha', seconds=0.8, text='slow')
            await until('the slow job runs', lambda: slow.status == 'running')
            t0 = time.monotonic()
            assert await m.reload_plugin('alpha', {'prefix': 'Z:'})
            # it ran with the old config
            assert slow.status == 'completed' and slow.result['text'] == 'alpha:slow'
            assert time.monotonic() - t0 > 0.3  # the busy holder was reloaded after its job, not interrupted
            reloaded = {p for p, k, n in loads(load_log) if (k, n) == ('reload', 'alpha')}
            assert reloaded == set(pids(m)), loads(load_log)
            later = [await m.start_job('alpha', text=str(i), seconds=0.2) for i in range(2)]
            later = [await finish(m, j) for j in later]
            assert [j.result['text'] for j in later] == ['Z:alpha:0', 'Z:alpha:1']
            assert {j.worker_pid for j in later} == set(pids(m))
            # unload reaches every holder
            assert await m.unload_plugin('alpha')
            assert [r['loaded_plugin'] for r in info(m)] == [None, None]
            assert all(r['restart_count'] == 0 for r in info(m))
            # and the next alpha job loads it afresh, with its reloaded config
            assert (await finish(m,
                                 await m.start_job('alpha', text='again'))).result['text'] == 'Z:alpha:again'
        finally: m.shutdown()
    run(main())

def test_reload_reaches_a_worker_that_loads_it_later(no_leftover_processes, load_log):
    "A worker that did not hold the plugin at the reload uses the new config when it next loads it."
    async def main():
        m, _ = make(2, cls=PoolManager)
        try:
            await m.start()
            assert await m.reload_plugin('beta', {'prefix': 'N:'})  # no holder: loads it in one worker
            holder = next(r['pid'] for r in info(m) if r['loaded_plugin'] == 'beta')
            # one on each worker
            two = [await m.start_job('beta', text=str(i), seconds=0.3) for i in range(2)]
            two = [await finish(m, j) for j in two]
            assert {j.worker_pid for j in two} == set(pids(m)) and two[0].worker_pid == holder
            assert [j.result['text'] for j in two] == ['N:beta:0', 'N:beta:1'], [j.result for j in two]
        finally: m.shutdown()
    run(main())

# ----- 5. soak ----------------------------------------------------------------------------------------------
def test_pool_soak_random_kills(no_leftover_processes):
    "Hundreds of jobs on three workers killed at random: every job ends exactly once, results are right."
    async def main():
        m, events = make(3, RestartPolicy.ALWAYS, max_restart_attempts=1000, cls=PoolManager)
        rng = random.Random(4321)
        try:
            await m.start()
            kinds = ['echo'] * 520 + ['sleep'] * 60
            rng.shuffle(kinds)
            jobs = [await m.start_job(k, text=f't{i}', seconds=0.004) for i, k in enumerate(kinds)]
            kills, killed = 0, set()
            while any(j.status not in TERMINAL_STATUSES for j in jobs):
                await asyncio.sleep(rng.uniform(0.01, 0.12))
                alive = [r['pid'] for r in info(m) if r['pid'] and r['alive']]
                if alive and kills < 15:
                    pid = rng.choice(alive)
                    try: os.kill(pid, signal.SIGKILL); kills += 1; killed.add(pid)
                    except ProcessLookupError: pass
                for j in jobs: assert not (j.status == 'completed' and j.result is None)
            # a kill of an idle worker after the last job may still be settling: wait until no row names a
            # killed pid and each counted crash has had its event
            crashes = lambda: sum(r['crashes'] for r in info(m))
            await until("every killed worker settled and its death told",
                        lambda: not killed & {r['pid'] for r in info(m)}
                        and crashes() == len(of_kind(events, 'worker_died')))
            await asyncio.sleep(0.1)
            ends = Counter(d['job_id'] for e, d in events.events if e.split(':')[1] in TERMINAL_STATUSES)
            assert all(ends.get(j.id) == 1 for j in jobs), "a job ended more or less than once"
            for j in jobs:
                if j.status == 'completed': assert j.result['text'] == j.params['text']
                else: assert j.status == 'failed' and 'Worker died' in j.error, (j.status, j.error)
            completed = sum(j.status == 'completed' for j in jobs)
            rows = info(m)
            print(f"\nsoak: {kills} kills, {completed}/{len(jobs)} completed, restarts "
                  f"{[r['restart_count'] for r in rows]}")
            assert kills >= 5 and completed > 400
            assert len(jobs) - completed <= kills  # a kill fails at most the job running on that worker
            assert sum(r['crashes'] for r in rows) == len(of_kind(events, 'worker_died')) <= kills
            assert all(r['cancels'] == 0 for r in rows)
            assert_str_job_ids(events)
        finally: m.shutdown()
        assert_terminal(m)
    run(main(), 90)

# ----- 6. GPU placement -------------------------------------------------------------------------------------
GPU_KEYS = ['CUDA_VISIBLE_DEVICES', 'CUDA_DEVICE_ORDER']

async def _env_per_worker(m):
    "Run `environ` on every worker at once; return {pid: env}."
    n = len(info(m))
    jobs = [await m.start_job('environ', keys=GPU_KEYS, seconds=0.3) for _ in range(n)]
    jobs = [await finish(m, j) for j in jobs]
    assert all(j.status == 'completed' for j in jobs), [j.error for j in jobs]
    out = {j.worker_pid: j.result['env'] for j in jobs}
    assert len(out) == n, "the environ jobs did not run one per worker"
    return out, jobs

def test_gpu_placement_explicit(no_leftover_processes):
    async def main():
        m, events = make(2, gpus=['GPU-aaa', 'GPU-bbb'], cls=PoolManager)
        try:
            await m.start()
            assert [r['gpu'] for r in info(m)] == ['GPU-aaa', 'GPU-bbb']
            envs, jobs = await _env_per_worker(m)
            for r in info(m):
                assert envs[r['pid']] == {'CUDA_VISIBLE_DEVICES': r['gpu'],
                                          'CUDA_DEVICE_ORDER': 'PCI_BUS_ID'}, envs
            await asyncio.sleep(0.05)
            started = {d['job_id']: d for d in of_kind(events, 'started')}
            for j in jobs:
                d = started[j.id]
                assert d['gpu'] == info(m)[d['worker_id']]['gpu'] and d['worker_pid'] == j.worker_pid, d
            # a replacement keeps its slot's GPU
            hang = await m.start_job('hang')
            await until('the hang job runs', lambda: hang.status == 'running')
            slot = row_of(m, hang.worker_pid)['worker_id']
            gpu = info(m)[slot]['gpu']
            assert await m.cancel_job(hang.id)
            await until('a new worker idle in the slot',
                        lambda: all_idle(m) and info(m)[slot]['pid'] != hang.worker_pid)
            assert [r['gpu'] for r in info(m)] == ['GPU-aaa', 'GPU-bbb']
            envs, _ = await _env_per_worker(m)
            assert envs[info(m)[slot]['pid']]['CUDA_VISIBLE_DEVICES'] == gpu
            await asyncio.sleep(0.05)
            died, restarted = of_kind(events, 'worker_died'), of_kind(events, 'worker_restarted')
            assert [(d['worker_id'], d['gpu'], d['pid'])
                    for d in died] == [(slot, gpu, hang.worker_pid)], died
            assert [(d['worker_id'], d['gpu'], d['restart_count'])
                    for d in restarted] == [(slot, gpu, 1)], restarted
        finally: m.shutdown()
    run(main())

def test_gpu_placement_auto_with_fake_nvml(no_leftover_processes):
    from cjm_fasthtml_workers.extensions.resources import ResourceManager, FakeNVML
    rm = ResourceManager(nvml=FakeNVML([FakeNVML.gpu(total=8 << 30, used=6 << 30),
                                        FakeNVML.gpu(total=8 << 30, used=1 << 30)]))
    async def main():
        m, events = make(2, gpus='auto', resource_manager=rm, cls=PoolManager)
        try:
            await m.start()
            assert [r['gpu'] for r in info(m)] == ['GPU-fake-1', 'GPU-fake-0']  # the most free first
            envs, jobs = await _env_per_worker(m)
            for r in info(m): assert envs[r['pid']]['CUDA_VISIBLE_DEVICES'] == r['gpu'], envs
            assert all(e['CUDA_DEVICE_ORDER'] == 'PCI_BUS_ID' for e in envs.values())
            await asyncio.sleep(0.05)
            assert {d['gpu'] for d in of_kind(events, 'started')} == {'GPU-fake-0', 'GPU-fake-1'}
        finally: m.shutdown()
    run(main())

# ----- 7. recycling after max_jobs_per_worker ---------------------------------------------------------------
def test_recycle_after_max_jobs(no_leftover_processes):
    async def main():
        m, events = make(2, max_jobs_per_worker=5, cls=PoolManager)
        try:
            await m.start()
            first = set(pids(m))
            jobs = [await m.start_job('echo', text=str(i)) for i in range(30)]
            done = [await finish(m, j) for j in jobs]
            assert [j.status for j in done] == ['completed'] * 30, [(j.status, j.error) for j in done]
            assert [j.result['text'] for j in done] == [str(i) for i in range(30)]
            per_pid = Counter(j.worker_pid for j in done)
            assert max(per_pid.values()) <= 5 and len(per_pid) >= 6, per_pid
            assert first <= set(per_pid)
            assert all(pid_gone(p) for p in first)  # the first two were replaced
            rows = info(m)
            assert sum(r['restart_count'] for r in rows) >= 4, rows
            assert all(r['crashes'] == 0 for r in rows), rows
            await asyncio.sleep(0.05)
            assert not [e for e, d in events.events if e == 'text:failed']
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

# ----- 8. preload -------------------------------------------------------------------------------------------
def test_preload_loads_once_per_worker(no_leftover_processes, load_log):
    async def main():
        m, _ = make(2, preload_plugins=['alpha'], cls=PoolManager)
        try:
            await m.start()
            await until('alpha preloaded on both',
                        lambda: [r['loaded_plugin'] for r in info(m)] == ['alpha', 'alpha'])
            before = set(pids(m))
            lines = loads(load_log)
            assert sorted(p for p, _, n in lines if n == 'alpha') == sorted(before), lines  # before any job
            jobs = [await m.start_job('alpha', text=str(i)) for i in range(4)]
            jobs = [await finish(m, j) for j in jobs]
            assert [j.result['text'] for j in jobs] == [f'alpha:{i}' for i in range(4)]
            assert {j.worker_pid for j in jobs} <= before
            assert Counter(p for p, _, n in loads(load_log)) == {p: 1 for p in before}, loads(load_log)
            # a replacement preloads too
            hang = await m.start_job('hang')
            await until('the hang job runs', lambda: hang.status == 'running')
            assert await m.cancel_job(hang.id)
            await until('a replacement worker idle, alpha preloaded',
                        lambda: all_idle(m) and hang.worker_pid not in pids(m)
                        and [r['loaded_plugin'] for r in info(m)].count('alpha') == 2)
            new = (set(pids(m)) - before).pop()
            assert [n for p, _, n in loads(load_log) if p == new] == ['alpha']
            job, other =(await m.start_job('alpha', text='x', seconds=0.3),
                         await m.start_job('alpha', text='y', seconds=0.3))
            job, other = await finish(m, job), await finish(m, other)
            assert {job.worker_pid, other.worker_pid} == set(pids(m))  # one each, the new worker too
            # its first job did not load again
            assert [n for p, _, n in loads(load_log) if p == new] == ['alpha']
        finally: m.shutdown()
    run(main())

# ----- 9. N=1 -----------------------------------------------------------------------------------------------
def test_single_worker_info_matches(no_leftover_processes):
    async def main():
        m, events = make(1, cls=PoolManager)
        try:
            rows = info(m)
            assert len(rows) == 1 and rows[0]['worker_id'] == 0 and rows[0]['state'] == 'not started', rows
            job = await finish(m, await m.start_job('echo', text='one'))
            assert job.result['text'] == 'one'
            rows, old = info(m), m.get_worker_info()
            assert len(rows) == 1 and set(rows[0]) >= INFO_KEYS, rows
            assert (rows[0]['worker_id'] == 0
                    and rows[0]['pid'] == old['pid'] == job.worker_pid == m.worker_process.pid)
            assert rows[0]['gpu'] is None and rows[0]['loaded_plugin'] == old['loaded_plugin'] == 'echo'
            assert rows[0]['jobs_done'] == 1 and old['pending_jobs'] == 0
            assert {'pid', 'alive', 'state', 'restart_count', 'current_job_id', 'loaded_plugin',
                    'pending_jobs'} <= set(old)
            await asyncio.sleep(0.05)
            assert events.of(job.id) == ['submitted', 'started', 'completed']
            assert of_kind(events, 'started')[0]['worker_id'] == 0
        finally: m.shutdown()
        assert info(m)[0]['state'] == 'stopped'
    run(main())

# ----- more: handed back, nobody left, per-slot budget ------------------------------------------------------
def test_handed_job_that_never_started_goes_to_another_worker(no_leftover_processes):
    async def main():
        m, events = make(2, RestartPolicy.ALWAYS, cls=PoolManager)
        frozen = []
        try:
            await m.start()
            frozen = pids(m)
            for p in frozen: os.kill(p, signal.SIGSTOP)  # frozen: a job reaches its pipe but cannot start
            job = await m.start_job('echo', text='survivor')
            await asyncio.sleep(0.2)
            holder = next(r for r in info(m) if r['current_job_id'] == job.id)
            assert job.status == 'pending'
            os.kill(holder['pid'], signal.SIGKILL)
            for p in frozen:
                if p != holder['pid']: os.kill(p, signal.SIGCONT)
            job = await finish(m, job)
            assert (job.status == 'completed' and job.result['text'] == 'survivor'
                    and job.worker_pid != holder['pid'])
            await asyncio.sleep(0.05)
            died = of_kind(events, 'worker_died')
            assert (len(died) == 1 and died[0]['worker_id'] == holder['worker_id']
                    and 'job_id' not in died[0]), died
        finally:
            for p in frozen:
                try: os.kill(p, signal.SIGCONT)
                except ProcessLookupError: pass
            m.shutdown()
    run(main())

def test_waiting_jobs_fail_only_when_no_worker_can_come_back(no_leftover_processes):
    async def main():
        m, _ = make(2, RestartPolicy.ON_CANCELLATION, cls=PoolManager)  # a crash is not restarted
        try:
            await m.start()
            slow = await m.start_job('sleep', seconds=0.8)
            bad = await m.start_job('kill')
            behind = [await m.start_job('echo', text=str(i)) for i in range(3)]
            bad = await finish(m, bad)
            assert bad.status == 'failed' and 'SIGKILL' in bad.error
            done = [await finish(m, j) for j in behind]  # the other worker is still there: they run
            assert ([j.status for j in done] == ['completed'] * 3
                    and {j.worker_pid for j in done} == {slow.worker_pid})
            dead = next(r for r in info(m) if r['pid'] != slow.worker_pid)
            assert not dead['alive'] and dead['crashes'] == 1 and dead['restart_count'] == 0, dead
            # start() (as would a submission) brings the dead slot back; with both workers busy, the kills and
            # the jobs behind them all wait, then both workers die in turn (had one died first, a submission
            # would have brought its slot back too)
            await m.start()
            busy = [await m.start_job('sleep', seconds=0.3) for _ in range(2)]
            kills = [await m.start_job('kill') for _ in range(2)]
            left = [await m.start_job('echo', text='late') for _ in range(2)]
            assert [(await finish(m, j)).status for j in busy] == ['completed'] * 2
            kills = [await finish(m, j) for j in kills]
            assert [j.status for j in kills] == ['failed'] * 2 and len({j.worker_pid for j in kills}) == 2
            left = [await finish(m, j) for j in left]
            assert ([j.status for j in left] == ['failed'] * 2
                    and all('not restarted' in j.error for j in left)), \
                [j.error for j in left]
            assert all(not r['alive'] and r['pid'] is None for r in info(m)), info(m)
            assert [r['crashes'] for r in info(m)] == [1, 2], info(m)  # slot 1 died in the first part too
        finally: m.shutdown()
        assert_terminal(m)
    run(main())

def test_restart_budget_is_per_worker(no_leftover_processes):
    async def main():
        m, _ = make(2, RestartPolicy.ALWAYS, max_restart_attempts=1, cls=PoolManager)
        try:
            await m.start()
            p0, p1 = pids(m)
            os.kill(p0, signal.SIGKILL)
            await until('a new worker idle',
                        lambda: info(m)[0]['state'] == 'idle' and info(m)[0]['pid'] not in (None, p0))
            assert info(m)[0]['restart_count'] == 1
            os.kill(info(m)[0]['pid'], signal.SIGKILL)  # a second crash in a row: over its budget of 1
            await until('the worker dead after 2 crashes',
                        lambda: not info(m)[0]['alive'] and info(m)[0]['crashes'] == 2)
            await asyncio.sleep(0.3)
            r0, r1 = info(m)
            assert (not r0['alive'] and r0['state'] in ('stopped', 'not started')
                    and r0['restart_count'] == 1), r0
            assert r1['pid'] == p1 and r1['alive'] and r1['restart_count'] == 0 and r1['crashes'] == 0, r1
            done = [await finish(m, await m.start_job('echo', text=str(i))) for i in range(3)]
            assert [j.status for j in done] == ['completed'] * 3 and {j.worker_pid for j in done} == {p1}
        finally: m.shutdown()
    run(main())
