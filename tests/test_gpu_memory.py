"""GPU memory as a managed resource (issue 21), without a GPU: keep-alive, jobs that start only where they
fit, eviction, learned needs, max_concurrency, memory recycling and retries.

The GPUs are a fake NVML (`FileNVML`, below) that accounts memory per process: a plugin `gNNNN...` "allocates"
NNNN MiB on its worker's GPU when it loads, by writing `<gpu uuid> <MiB>` to the file `$FAKE_GPU_DIR/<its
pid>`, and gives it back when it unloads (or its process ends). The allocation is checked under a file lock
against the GPU's size ($FAKE_GPU_TOTALS): one that would not fit is an out-of-memory error, written to
`$FAKE_GPU_DIR/oom` (the tests assert that none happened) and raised. The manager reads the same files through
`ResourceManager(nvml=FileNVML)`."""
import asyncio, fcntl, os, re, time
from collections import Counter
from types import SimpleNamespace

import psutil, pytest

from cjm_fasthtml_workers.core.config import PluginPolicy, RestartPolicy, WorkerConfig
from cjm_fasthtml_workers.core.worker import base_worker_process
from cjm_fasthtml_workers.extensions.resources import FakeNVML, ResourceManager
from cjm_fasthtml_workers.managers.scheduler import WAIT_MEMORY
from cjm_fasthtml_workers.testing import PLUGIN_NAMES, ScenarioPluginManager
from helpers import Recorder, TextJobManager, finish, until

DIR_ENV, TOTALS_ENV = 'FAKE_GPU_DIR', 'FAKE_GPU_TOTALS'
SIZED = ['g1000', 'g1200', 'g1400', 'g2000', 'g3000', 'g4096a', 'g4096b', 'g4096c', 'g4096d']
EXTRA = SIZED + ['rss', 'crashy']

# ----- the fake GPUs, shared by the app (FileNVML) and the workers (allocate/release) -----------------------
def usage(root:str, gpu:str) -> dict: # pid -> MiB of the live processes that hold memory on `gpu`
    out = {}
    for name in os.listdir(root):
        if not name.isdigit(): continue
        try:
            with open(os.path.join(root, name)) as f: uuid, mb = f.read().split()
            if psutil.Process(int(name)).status() == psutil.STATUS_ZOMBIE: continue
        except (OSError, ValueError, psutil.Error): continue  # gone, or being written
        if uuid == gpu: out[int(name)] = int(mb)
    return out

def _totals() -> dict:
    return {g: int(mb) for g, mb in (kv.split('=') for kv in os.environ[TOTALS_ENV].split(','))}

def _locked(root:str):
    f = open(os.path.join(root, 'lock'), 'a')
    fcntl.flock(f, fcntl.LOCK_EX)
    return f

def allocate(mb:int):
    ("In a worker: take `mb` MiB of its GPU; past the GPU's size it is an out-of-memory error (recorded, "
     "raised).")
    root, gpu, me = os.environ[DIR_ENV], os.environ.get('CUDA_VISIBLE_DEVICES'), os.getpid()
    with _locked(root):
        others = sum(v for p, v in usage(root, gpu).items() if p != me)
        if others + mb > _totals()[gpu]:
            with open(os.path.join(root, 'oom'), 'a') as f: f.write(f"{me} {gpu} {others}+{mb}\n")
            raise MemoryError(f"CUDA out of memory (fake): {others} + {mb} MiB > {_totals()[gpu]} MiB on "
                              f"{gpu}")
        with open(os.path.join(root, str(me)), 'w') as f: f.write(f"{gpu} {mb}")
        with open(os.path.join(root, 'loads'), 'a') as f: f.write(f"{me} {gpu} {mb}\n")

def release():
    root = os.environ[DIR_ENV]
    with _locked(root):
        try: os.unlink(os.path.join(root, str(os.getpid())))
        except FileNotFoundError: pass

class FileNVML(FakeNVML):
    "A pynvml stand-in whose devices' processes and memory are what the workers wrote under `root`."
    def __init__(self, root:str, totals_mb:list):
        super().__init__([FakeNVML.gpu(total=t << 20) for t in totals_mb])
        self.root = root
    def _used(self, h): return usage(self.root, f"GPU-fake-{h}")
    def nvmlDeviceGetMemoryInfo(self, h):
        total, used = self.gpus[h]['total'], sum(self._used(h).values()) << 20
        return SimpleNamespace(total=total, used=used, free=total - used)
    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p, usedGpuMemory=mb << 20) for p, mb in self._used(h).items()]

# ----- what the workers run ---------------------------------------------------------------------------------
class GpuPluginManager(ScenarioPluginManager):
    "The scenario plugins, `gNNNN` (take NNNN MiB of the fake GPU while loaded), `rss` and `crashy`."
    def discover_plugins(self): return [{'name': n} for n in PLUGIN_NAMES + EXTRA]
    def _alloc(self, name):
        if (m := re.match(r'g(\d{4})', name)): allocate(int(m.group(1)))
    def load_plugin(self, plugin_data, config):
        super().load_plugin(plugin_data, config)
        self._alloc(plugin_data['name'])
    def reload_plugin(self, plugin_name, config=None):
        super().reload_plugin(plugin_name, config)
        if config is not None: self._alloc(plugin_name)
    def unload_plugin(self, plugin_name):
        super().unload_plugin(plugin_name)
        if plugin_name.startswith('g') and plugin_name[1:2].isdigit(): release()
    def execute_plugin(self, plugin_name, **params):
        if plugin_name in SIZED:
            time.sleep(params.get('seconds', 0))
            return {'pid': os.getpid(), 'gpu': os.environ.get('CUDA_VISIBLE_DEVICES')}
        if plugin_name == 'rss':  # resident memory the plugin keeps (a leak)
            self.ballast = bytearray(b'\x01') * (params['mb'] << 20)
            return {'pid': os.getpid()}
        if plugin_name == 'crashy':  # dies on its first `crashes` runs (counted in a file), then succeeds
            with open(params['count_file'], 'a+') as f:
                f.write('x'); f.seek(0); runs = len(f.read())
            if runs <= params.get('crashes', 2): os._exit(9)
            return {'runs': runs}
        return super().execute_plugin(plugin_name, **params)

def gpu_worker_process(request_queue, result_queue, response_queue):
    base_worker_process(request_queue, result_queue, response_queue, GpuPluginManager,
                        supports_streaming=True)

class GpuManager(TextJobManager):
    def get_worker_entry_point(self): return gpu_worker_process

# ----- helpers ----------------------------------------------------------------------------------------------
@pytest.fixture
def gpus(tmp_path, monkeypatch):
    "Two fake GPUs of 4096 MiB; returns a function making the resource manager that reads them."
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    monkeypatch.setenv(TOTALS_ENV, 'GPU-fake-0=4096,GPU-fake-1=4096')
    return lambda: ResourceManager(nvml=FileNVML(str(tmp_path), [4096, 4096]))

def ooms(tmp_path) -> list:
    p = tmp_path/'oom'
    return p.read_text().splitlines() if p.exists() else []

def make(n, rm=None, **cfg):
    events = Recorder()
    m = GpuManager('text', 'test', event_broadcaster=events, resource_manager=rm,
                   worker_config=WorkerConfig(max_workers=n, **cfg))
    return m, events

def run(coro, timeout=90): return asyncio.run(asyncio.wait_for(coro, timeout))
def loaded(m): return [r['loaded_plugin'] for r in m.get_workers_info()]
def of_kind(events, kind): return [d for e, d in events.events if e == f'text:{kind}']
def unloads(events): return [(d['worker_id'], d['plugin'], d['reason'])
                             for d in of_kind(events, 'plugin_unloaded')]
def sized(*names): return {n: PluginPolicy(gpu_memory_mb=int(re.match(r'g(\d{4})', n).group(1)))
                           for n in names}

# ----- keep-alive -------------------------------------------------------------------------------------------
def test_keep_alive_on_cpu_unloads_after_the_time_and_not_before(no_leftover_processes):
    async def main():
        m, events = make(2, keep_alive_seconds=1)
        try:
            await m.start()
            jobs = [await m.start_job(p, seconds=0.2) for p in ('sleep', 'progress')]
            for j in jobs: assert (await finish(m, j)).status == 'completed'
            ended = time.monotonic()
            await asyncio.sleep(0.5)
            assert sorted(filter(None, loaded(m))) == ['progress', 'sleep']  # not before its time
            assert all(0.3 < r['idle_seconds'] < 1.0 for r in m.get_workers_info()), m.get_workers_info()
            await until('no plugin loaded', lambda: loaded(m) == [None, None], timeout=3.0)
            assert time.monotonic() - ended < 3.0  # no plugin loaded 3 s after the last job
            await asyncio.sleep(0.05)
            assert sorted(u[1:] for u in unloads(events)) == [('progress', 'idle'),
                                                              ('sleep', 'idle')], unloads(events)
            assert all(r['idle_seconds'] is None for r in m.get_workers_info())
        finally: m.shutdown()
    run(main())

def test_keep_alive_never_unloads_a_busy_or_awaited_plugin(no_leftover_processes, gpus, tmp_path):
    async def main():
        m, events = make(1, gpus(), gpus=[0], keep_alive_seconds=0,
                         plugin_policies={'g1000': PluginPolicy(keep_alive_seconds=0.3)})
        try:
            # keep-alive 0: unloaded after each job
            jobs = [await m.start_job('echo', text=str(i)) for i in range(5)]
            assert [(await finish(m, j)).status for j in jobs] == ['completed'] * 5
            await until('the plugin unloaded', lambda: loaded(m) == [None])
            long = await m.start_job('g1000', seconds=1.0)
            await until('the long job runs', lambda: long.status == 'running')
            await asyncio.sleep(0.6)  # past its keep-alive, but busy
            assert loaded(m) == ['g1000'] and long.status == 'running'
            assert (await finish(m, long)).status == 'completed'
            await until('the plugin unloaded', lambda: loaded(m) == [None], timeout=3)
            await asyncio.sleep(0.05)
            # the 5 echo jobs waited for the plugin: it was unloaded once, after the last
            assert unloads(events) == [(0, 'echo', 'idle'), (0, 'g1000', 'idle')], unloads(events)
            assert (tmp_path/'loads').read_text().count('\n') == 1 and not ooms(tmp_path)
        finally: m.shutdown()
    run(main())

# ----- fit before start, eviction ---------------------------------------------------------------------------
def test_eviction_least_recently_used_first(no_leftover_processes, gpus, tmp_path):
    async def main():  # three workers on GPU 0 (4096 MiB)
        m, events = make(3, gpus(), gpus=[0], workers_per_gpu=3, gpu_memory_margin_mb=0,
                         plugin_policies=sized('g1000', 'g1200', 'g1400', 'g2000'))
        try:
            await m.start()
            for p in ('g1000', 'g1200', 'g1400'):  # 3600 MiB used, in that order: g1000 the least recent
                assert (await finish(m, await m.start_job(p))).status == 'completed'
            assert loaded(m) == ['g1000', 'g1200', 'g1400']
            big = await finish(m, await m.start_job('g2000'))  # 496 MiB free: two must go, the oldest two
            assert big.status == 'completed', big.error
            await asyncio.sleep(0.05)
            assert sorted(unloads(events)) == [(0, 'g1000', 'memory'),
                                               (1, 'g1200', 'memory')], unloads(events)
            assert 'g1400' in loaded(m) and 'g2000' in loaded(m)
            assert not ooms(tmp_path)
            assert {r['gpu_memory_mb'] for r in m.get_workers_info()
                    if r['loaded_plugin'] == 'g1400'} == {1400}
        finally: m.shutdown()
    run(main())

def test_jobs_wait_rather_than_overcommit_and_too_big_fails(no_leftover_processes, gpus, tmp_path):
    async def main():  # one worker per GPU; g3000 on GPU 0 stays busy, so g2000 waits for its memory
        m, events = make(2, gpus(), gpus=[0, 0], gpu_memory_margin_mb=0,
                         plugin_policies={**sized('g3000', 'g2000'),
                                          'g4096a': PluginPolicy(gpu_memory_mb=5000)})
        try:
            await m.start()
            hold = await m.start_job('g3000', seconds=1.5)
            await until('the holding job runs', lambda: hold.status == 'running')
            small = await m.start_job('g2000')
            await asyncio.sleep(0.5)
            assert small.status == 'pending' and m.job_wait_reason(small.id) == WAIT_MEMORY
            # once g3000's worker is free, it swaps there
            assert (await finish(m, small)).status == 'completed'
            assert small.started_at >= hold.completed_at and small.worker_pid == hold.worker_pid
            huge = await finish(m, await m.start_job('g4096a'))  # declared larger than any GPU: fails at once
            assert huge.status == 'failed' and huge.attempts == 0, huge
            assert 'g4096a needs 5000 MiB' in huge.error and 'GPU-fake-0: 4096 MiB' in huge.error, huge.error
            assert not ooms(tmp_path)
        finally: m.shutdown()
    run(main())

@pytest.mark.timeout(200)  # its own run() allows 180 s: the suite's 120 s would cut it short first
def test_soak_no_overcommit(no_leftover_processes, gpus, tmp_path):
    ("1,000 tiny jobs over 4 plugins of 4096 MiB each (2x the two GPUs' memory), 2 workers per GPU: "
     "0 overcommits.")
    plugins = ['g4096a', 'g4096b', 'g4096c', 'g4096d']
    async def main():
        m, events = make(4, gpus(), gpus='auto', workers_per_gpu=2, gpu_memory_margin_mb=0,
                         plugin_policies=sized(*plugins))
        try:
            await m.start()
            order = [plugins[(i * 7 + i // 13) % 4] for i in range(1000)]  # mixed, with runs of one plugin
            jobs = [await m.start_job(p) for p in order]
            done = [await finish(m, j, timeout=120) for j in jobs]
            assert Counter(j.status for j in done) == {'completed': 1000}, [j.error for j in done
                                                                            if j.error][:3]
            await asyncio.sleep(0.05)
            loads = (tmp_path/'loads').read_text().count('\n')  # each a whole GPU: loads replace one another
            assert loads >= 4 and not ooms(tmp_path), (loads, ooms(tmp_path))
            for j in done: assert j.result['gpu'] in ('GPU-fake-0', 'GPU-fake-1')
        finally: m.shutdown()
    run(main(), timeout=180)

def test_learned_need(no_leftover_processes, gpus, tmp_path):
    async def main():  # g3000 declares nothing: its first run is measured, then its need holds others back
        m, events = make(2, gpus(), gpus=[0, 0], gpu_memory_margin_mb=0, plugin_policies=sized('g2000'))
        try:
            await m.start()
            assert (await finish(m, await m.start_job('g3000'))).status == 'completed'
            await until('the need of g3000 learned', lambda: m._supervisor.seen.get('g3000') == 3000)
            assert await m.unload_plugin('g3000')
            await asyncio.sleep(0.1)
            first = await m.start_job('g3000', seconds=1.0)
            # 4096 - 3000 learned < 2000: it waits, it does not overcommit
            second = await m.start_job('g2000')
            assert (await finish(m, second)).status == 'completed'
            assert second.started_at >= first.completed_at
            await asyncio.sleep(0.05)
            assert ('request' in {u[2] for u in unloads(events)}) and not ooms(tmp_path)
        finally: m.shutdown()
    run(main())

def test_idle_exit_gives_the_worker_back(no_leftover_processes, gpus, tmp_path):
    async def main():
        m, events = make(2, gpus(), gpus='auto', keep_alive_seconds=0.3, idle_unload='exit',
                         plugin_policies=sized('g1000'))
        try:
            await m.start()
            pid = (await finish(m, await m.start_job('g1000'))).worker_pid
            await until('the idle worker exited', lambda: not psutil.pid_exists(pid)
                        or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
            # its slot waits for a job
            await until('its slot is empty', lambda: m.get_workers_info()[0]['pid'] is None)
            await asyncio.sleep(0.05)
            assert of_kind(events, 'worker_died') == [] and unloads(events) == [(0, 'g1000', 'idle')]
            # the other worker takes it, or the slot restarts
            again = await finish(m, await m.start_job('g1000'))
            assert again.status == 'completed' and again.worker_pid != pid
        finally: m.shutdown()
    run(main())

# ----- max_concurrency, memory recycling --------------------------------------------------------------------
def test_max_concurrency(no_leftover_processes):
    async def main():
        m, _ = make(3, plugin_policies={'sleep': PluginPolicy(max_concurrency=1)})
        try:
            await m.start()
            sleeps = [await m.start_job('sleep', seconds=0.3) for _ in range(3)]
            echo = await m.start_job('echo', text='x')
            await until('the first sleep job runs', lambda: sleeps[0].status == 'running')
            assert m.job_wait_reason(sleeps[1].id) == 'max_concurrency: 1 jobs of sleep run'
            assert (await finish(m, echo)).status == 'completed'
            done = [await finish(m, j) for j in sleeps]
            spans = sorted((j.started_at, j.completed_at) for j in done)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # never two at once
            assert echo.started_at < done[0].completed_at  # the others were not held back
        finally: m.shutdown()
    run(main())

def test_memory_recycling(no_leftover_processes):
    async def main():
        m, events = make(1, max_worker_memory_mb=300)
        try:
            await m.start()
            pid = m.get_workers_info()[0]['pid']
            assert (await finish(m, await m.start_job('rss', mb=400))).status == 'completed'
            await until('a new worker in the slot', lambda: m.get_workers_info()[0]['pid'] not in (None, pid),
                        timeout=10)
            after = await finish(m, await m.start_job('echo', text='x'))
            assert after.status == 'completed' and after.worker_pid != pid
            assert m.get_workers_info()[0]['crashes'] == 0
        finally: m.shutdown()
    run(main())

# ----- retries ----------------------------------------------------------------------------------------------
def test_retries_a_plugin_that_crashes_its_first_two_runs(no_leftover_processes, tmp_path):
    async def main():
        m, events = make(1, plugin_policies={'crashy': PluginPolicy(max_retries=2)})
        try:
            job = await finish(m, await m.start_job('crashy', count_file=str(tmp_path/'c1')), timeout=30)
            assert job.status == 'completed' and job.result == {'runs': 3} and job.attempts == 3, job
            await asyncio.sleep(0.05)
            retrying = of_kind(events, 'retrying')
            assert [(d['job_id'], d['attempt'], d['delay_seconds']) for d in retrying] == [(job.id, 2, 1.0),
                                                                                           (job.id, 3, 2.0)]
            assert 'Worker died while running the job' in retrying[0]['error']
            failing = await finish(m, await m.start_job('crashy', count_file=str(tmp_path/'c2'), crashes=9),
                                   timeout=30)
            assert failing.status == 'failed' and failing.attempts == 3
            assert failing.error.startswith('Failed on each of its 3 attempts: 1) Worker died'), failing.error
            own = await finish(m, await m.start_job('fail'))  # the plugin's own exception: not retried
            assert own.status == 'failed' and own.attempts == 1
        finally: m.shutdown()
    run(main(), timeout=60)
