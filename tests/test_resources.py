"ResourceManager against real processes (psutil), a fake NVML, threads, and a real GPU when there is one."
import asyncio, gc, logging, os, subprocess, sys, threading, time
from types import SimpleNamespace

import psutil, pytest

from cjm_fasthtml_workers.extensions import resources
from cjm_fasthtml_workers.extensions.protocols import ResourceManagerProtocol
from cjm_fasthtml_workers.extensions.resources import FakeNVML, ResourceManager, ResourceStatus, ResourceType
from conftest import pid_gone

G = 1 << 30
# above Linux's largest pid_max: never a process here (as NVML pids from another namespace)
IMPOSSIBLE_PID = 2**23 + 7

# ----- helpers ----------------------------------------------------------------------------------------------
SLEEPER = [sys.executable, '-c', 'import time; time.sleep(60)']
# A worker that starts a grandchild it never declares, and prints the grandchild's pid.
SPAWNER = [sys.executable, '-c', 'import subprocess, sys, time\n'
           'c = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])\n'
           'print(c.pid, flush=True)\ntime.sleep(60)']

def spawn_worker_with_child():
    "A real worker process and its undeclared grandchild's pid."
    worker = subprocess.Popen(SPAWNER, stdout=subprocess.PIPE, text=True)
    return worker, int(worker.stdout.readline())

def end_tree(worker, *pids):
    "Kill the given descendants, then the worker, and reap it."
    for pid in pids:
        try: psutil.Process(pid).kill()
        except psutil.NoSuchProcess: pass
    worker.kill(); worker.wait()
    if worker.stdout: worker.stdout.close()
    for pid in pids: assert pid_gone(pid), f"process {pid} survived"

# ----- process tree -----------------------------------------------------------------------------------------
def test_undeclared_grandchild_is_found(no_leftover_processes):
    worker, grandchild = spawn_worker_with_child()
    try:
        rm = ResourceManager()
        rm.register_worker(worker.pid, 'server')
        assert rm.get_all_related_pids(worker.pid) == [worker.pid, grandchild]
        assert rm.get_all_app_pids_including_children() == {worker.pid, grandchild}
        assert rm.get_app_pids() == {worker.pid}
    finally: end_tree(worker, grandchild)
    assert rm.get_all_app_pids_including_children() == set()  # the dead worker is dropped, its tree with it

def test_grandchild_found_at_each_check_not_only_at_registration(no_leftover_processes):
    # registered before it spawns anything: a plugin that starts its server later is still counted
    worker = subprocess.Popen([sys.executable, '-c', 'import subprocess, sys, time\n'
                               'sys.stdin.readline()\n'
                               'c = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])\n'
                               'print(c.pid, flush=True)\ntime.sleep(60)'],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    grandchild = None
    try:
        rm = ResourceManager()
        rm.register_worker(worker.pid, 'server')
        assert rm.get_all_related_pids(worker.pid) == [worker.pid]
        worker.stdin.write('go\n'); worker.stdin.flush()
        grandchild = int(worker.stdout.readline())
        assert rm.get_all_related_pids(worker.pid) == [worker.pid, grandchild]
    finally:
        worker.stdin.close()
        end_tree(worker, *([grandchild] if grandchild else []))

def test_child_of_app_worker_on_gpu_is_the_apps(no_leftover_processes):
    worker, grandchild = spawn_worker_with_child()
    try:
        fake = FakeNVML([FakeNVML.gpu(total=80 * G, processes={grandchild: 40 * G, IMPOSSIBLE_PID: 2 * G})])
        rm = ResourceManager(nvml=fake)
        rm.register_worker(worker.pid, 'llm')
        c = rm.check_gpu_availability(device_index=0)
        assert c.status is ResourceStatus.APP_BUSY
        assert c.app_pids == [grandchild] and c.external_pids == [IMPOSSIBLE_PID]
        row = c.app_processes[0]
        assert row['worker_pid'] == worker.pid and row['gpu_memory'] == 40 * G
        assert row['name'] == psutil.Process(grandchild).name() and row['memory_rss'] > 0
        assert c.details['external_memory'] == 2 * G
        # unregistered, the same process is someone else's, and over the threshold
        rm.unregister_worker(worker.pid)
        c = rm.check_gpu_availability(device_index=0)
        assert c.status is ResourceStatus.EXTERNAL_BUSY and grandchild in c.external_pids and c.app_pids == []
    finally: end_tree(worker, grandchild)

# ----- dead workers and reused pids -------------------------------------------------------------------------
@pytest.mark.parametrize('reap', [True, False], ids=['reaped', 'zombie'])
def test_dead_worker_is_reported_and_dropped(no_leftover_processes, caplog, reap):
    worker = subprocess.Popen(SLEEPER)
    try:
        rm = ResourceManager(unregister_grace_seconds=0)  # never unregistered: a leak at once
        rm.register_worker(worker.pid, 'stt', job_id='job-1')
        assert rm.get_worker_by_job('job-1').pid == worker.pid
        worker.kill()
        if reap: worker.wait()
        else: assert pid_gone(worker.pid)  # a zombie: ended, not yet reaped
        with caplog.at_level(logging.WARNING, logger=resources.__name__):
            assert rm.get_worker_by_pid(worker.pid) is None
        assert any(str(worker.pid) in r.getMessage() and 'job-1' in r.getMessage() for r in caplog.records)
        assert rm.get_worker_by_job('job-1') is None and rm.get_all_workers() == []
        assert rm.prune_dead_workers() == []  # reported once
    finally:
        worker.kill(); worker.wait()

def test_prune_returns_dropped_states(no_leftover_processes):
    a, b = subprocess.Popen(SLEEPER), subprocess.Popen(SLEEPER)
    try:
        rm = ResourceManager()
        rm.register_worker(a.pid, 'x'); rm.register_worker(b.pid, 'y')
        a.kill(); a.wait()
        dropped = rm.prune_dead_workers()
        assert [(w.pid, w.worker_type) for w in dropped] == [(a.pid, 'x')]
        assert [w.pid for w in rm.get_all_workers()] == [b.pid]
    finally:
        for p in (a, b): p.kill(); p.wait()

def test_reused_pid_is_not_the_worker(no_leftover_processes, monkeypatch):
    worker, grandchild = spawn_worker_with_child()
    try:
        rm = ResourceManager()
        rm.register_worker(worker.pid, 'server')
        real = psutil.Process.create_time
        # from now on, `worker.pid` reads as a process started an hour later: its pid was reused
        monkeypatch.setattr(psutil.Process, 'create_time',
                            lambda self: real(self) + (3600 if self.pid == worker.pid else 0))
        assert rm.get_all_app_pids_including_children() == set()  # not the worker, nor its children
        assert rm.get_worker_by_pid(worker.pid) is None
        monkeypatch.undo()
        # registered again, the "new" process is tracked as itself
        rm.register_worker(worker.pid, 'server')
        assert rm.get_all_related_pids(worker.pid) == [worker.pid, grandchild]
    finally: end_tree(worker, grandchild)

def test_pid_that_was_never_a_process_is_kept():
    rm = ResourceManager()
    rm.register_worker(IMPOSSIBLE_PID, 'remote', plugin_instance=None)
    assert rm.get_worker_by_pid(IMPOSSIBLE_PID).create_time is None
    assert rm.prune_dead_workers() == [] and rm.get_app_pids() == {IMPOSSIBLE_PID}
    assert rm.get_all_related_pids(IMPOSSIBLE_PID) == [IMPOSSIBLE_PID]

# ----- state updates ----------------------------------------------------------------------------------------
def test_job_is_cleared_and_finished_jobs_do_not_pile_up():
    rm = ResourceManager()
    rm.register_worker(IMPOSSIBLE_PID, 'stt')
    for i in range(1000):
        rm.update_worker_state(IMPOSSIBLE_PID, status='running', job_id=f'job-{i}')
        assert rm.get_worker_by_job(f'job-{i}').pid == IMPOSSIBLE_PID
        rm.update_worker_state(IMPOSSIBLE_PID, status='idle', job_id=None)
        assert rm.get_worker_by_job(f'job-{i}') is None
    w = rm.get_worker_by_pid(IMPOSSIBLE_PID)
    assert (w.status, w.job_id) == ('idle', None)

def test_update_only_changes_given_fields():
    rm = ResourceManager()
    rm.register_worker(IMPOSSIBLE_PID, 'stt', plugin_id='p', plugin_name='whisper', config={'model': 'tiny'})
    rm.update_worker_state(IMPOSSIBLE_PID, status='running')
    w = rm.get_worker_by_pid(IMPOSSIBLE_PID)
    assert ((w.plugin_id, w.plugin_name, w.config, w.loaded_plugin_resource)
            == ('p', 'whisper', {'model': 'tiny'}, 'tiny'))
    rm.update_worker_state(IMPOSSIBLE_PID, plugin_name=None, plugin_id=None, loaded_plugin_resource=None,
                           config=None)
    w = rm.get_worker_by_pid(IMPOSSIBLE_PID)
    assert ((w.status, w.plugin_id, w.plugin_name, w.config, w.loaded_plugin_resource)
            == ('running', None, None, None, None))

def test_satisfies_protocol():
    assert isinstance(ResourceManager(), ResourceManagerProtocol)

# ----- threads ----------------------------------------------------------------------------------------------
def test_threads_hammering_update_and_get():
    rm, n_threads, rounds = ResourceManager(), 8, 400
    errors, start = [], threading.Barrier(n_threads)
    pids = [IMPOSSIBLE_PID + i for i in range(n_threads)]
    def hammer(t):
        try:
            start.wait()
            pid = pids[t]
            for i in range(rounds):
                rm.register_worker(pid, f'type-{t % 2}')
                rm.update_worker_state(pid, status='running', job_id=f'{t}-{i}')
                w = rm.get_worker_by_job(f'{t}-{i}')
                assert w is not None and w.pid == pid, (t, i, w)
                rm.get_all_app_pids_including_children(); rm.get_active_worker_types()
                rm.update_worker_state(pid, status='idle', job_id=None)
                if i % 50 == 49: rm.unregister_worker(pid)
            rm.register_worker(pid, f'type-{t % 2}', job_id=f'final-{t}')
        except BaseException as e: errors.append(e)
    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(n_threads)]
    for th in threads: th.start()
    for th in threads: th.join(60)
    assert not errors, errors[:3]
    assert sorted(w.pid for w in rm.get_all_workers()) == pids
    assert all(rm.get_worker_by_job(f'final-{t}').pid == pids[t] for t in range(n_threads))
    assert rm.get_active_worker_types() == {'type-0', 'type-1'}

def test_threads_share_one_nvml_init():
    fake = FakeNVML([FakeNVML.gpu(processes={IMPOSSIBLE_PID: G})])
    rm = ResourceManager(nvml=fake)
    threads = [threading.Thread(target=lambda: [rm.check_gpu_availability() for _ in range(50)])
               for _ in range(8)]
    for th in threads: th.start()
    for th in threads: th.join(60)
    assert fake.init_calls == 1

# ----- fake NVML: per-device classification -----------------------------------------------------------------
def test_per_device_classification():
    fake = FakeNVML([
        FakeNVML.gpu(total=100 * G, processes={IMPOSSIBLE_PID: 60 * G}),       # external, over 45%
        FakeNVML.gpu(total=100 * G, processes={IMPOSSIBLE_PID + 1: 20 * G}),   # an app worker's child
        FakeNVML.gpu(total=100 * G, processes={IMPOSSIBLE_PID + 2: 10 * G})])  # external, under 45%
    class Plugin:
        def get_child_pids(self): return [IMPOSSIBLE_PID + 1]
    rm = ResourceManager(gpu_memory_threshold_percent=45.0, nvml=fake)
    rm.register_worker(IMPOSSIBLE_PID + 100, 'llm', plugin_instance=Plugin())
    per = [rm.check_gpu_availability(device_index=i) for i in range(3)]
    assert [c.status for c in per] == [ResourceStatus.EXTERNAL_BUSY, ResourceStatus.APP_BUSY,
                                       ResourceStatus.AVAILABLE]
    assert [c.device_index for c in per] == [0, 1, 2]
    assert [c.external_pids for c in per] == [[IMPOSSIBLE_PID], [], [IMPOSSIBLE_PID + 2]]
    assert per[1].app_processes[0]['worker_pid'] == IMPOSSIBLE_PID + 100
    assert per[0].details['external_percent'] == pytest.approx(60.0)
    everything = rm.check_gpu_availability()
    assert everything.status is ResourceStatus.AVAILABLE  # the freest device: device 2
    assert [d.status for d in everything.devices] == [c.status for c in per]
    assert everything.external_pids == [IMPOSSIBLE_PID, IMPOSSIBLE_PID + 2]
    assert [r['gpu_index'] for r in everything.external_processes] == [0, 2]
    with pytest.raises(ValueError, match='no GPU with index 3'): rm.check_gpu_availability(device_index=3)

def test_threshold_decides_external_busy():
    fake = FakeNVML([FakeNVML.gpu(total=100 * G, processes={IMPOSSIBLE_PID: 50 * G})])
    assert ResourceManager(40.0, nvml=fake).check_gpu_availability().status is ResourceStatus.EXTERNAL_BUSY
    assert ResourceManager(60.0, nvml=fake).check_gpu_availability().status is ResourceStatus.AVAILABLE

def test_memory_no_visible_process_holds_counts_as_external():
    # e.g. another container's process: NVML shows the used memory, not the process
    fake = FakeNVML([FakeNVML.gpu(total=100 * G, used=70 * G, processes={IMPOSSIBLE_PID + 1: 10 * G})])
    rm = ResourceManager(nvml=fake)
    rm.register_worker(IMPOSSIBLE_PID + 1, 'llm')
    c = rm.check_gpu_availability(0)
    assert c.status is ResourceStatus.EXTERNAL_BUSY and c.external_pids == []
    assert c.details['external_memory'] == 60 * G and c.details['app_memory'] == 10 * G

def test_nvml_failures_are_answers(monkeypatch):
    rm = ResourceManager(nvml=FakeNVML(init_error='Driver Not Loaded'))
    c = rm.check_gpu_availability()
    assert (c.status, c.devices, rm.gpu_available) == (ResourceStatus.AVAILABLE, [], False)
    assert 'Driver Not Loaded' in rm.gpu_unavailable_reason and 'Driver Not Loaded' in c.message
    broken = FakeNVML([FakeNVML.gpu()])
    def lost(h): raise FakeNVML.NVMLError('GPU is lost')
    broken.nvmlDeviceGetMemoryInfo = lost
    rm = ResourceManager(nvml=broken)
    assert rm.get_gpu_info() == [] and 'GPU is lost' in rm.gpu_unavailable_reason
    monkeypatch.setitem(sys.modules, 'pynvml', None)  # pynvml not installed
    rm = ResourceManager()
    assert rm.get_gpu_info() == [] and 'nvidia-ml-py' in rm.gpu_unavailable_reason

def test_nvml_shut_down_by_close_and_by_garbage_collection():
    fake = FakeNVML([FakeNVML.gpu()])
    rm = ResourceManager(nvml=fake)
    assert fake.init_calls == 0  # lazy
    rm.get_gpu_info(); rm.check_gpu_availability(); rm.close()
    assert (fake.init_calls, fake.shutdown_calls) == (1, 1)
    rm.get_gpu_info()  # usable again after close
    assert fake.init_calls == 2
    del rm; gc.collect()
    assert fake.shutdown_calls == 2

def test_import_does_not_touch_nvml():
    code = ('import sys; import cjm_fasthtml_workers.extensions.resources as r; '
            'print("pynvml" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'False'

# ----- system memory ----------------------------------------------------------------------------------------
def fake_virtual_memory(total, used):
    return lambda: SimpleNamespace(total=total, available=total - used, percent=100.0 * used / total,
                                   used=used)

def test_memory_busy_because_of_the_app(no_leftover_processes, monkeypatch):
    worker = subprocess.Popen(SLEEPER)
    try:
        rm = ResourceManager()
        rm.register_worker(worker.pid, 'stt')
        app_rss = psutil.Process(worker.pid).memory_info().rss + psutil.Process().memory_info().rss
        # used = the app's memory plus a little: 37.5% used, about 12.5% of it outside the app
        monkeypatch.setattr(resources.psutil, 'virtual_memory',
                            fake_virtual_memory(4 * app_rss, int(1.5 * app_rss)))
        c = rm.check_memory_availability(threshold_percent=30.0)
        assert c.status is ResourceStatus.APP_BUSY, c.message
        assert c.resource_type is ResourceType.SYSTEM_MEMORY
        assert worker.pid in c.app_pids and os.getpid() in c.app_pids
        assert c.details['app_memory'] == pytest.approx(app_rss, rel=0.2)
        assert worker.pid not in c.external_pids and len(c.external_processes) <= 5
        # the same use with most of it outside the app
        monkeypatch.setattr(resources.psutil, 'virtual_memory', fake_virtual_memory(4 * app_rss, 3 * app_rss))
        c = rm.check_memory_availability(threshold_percent=30.0)
        assert c.status is ResourceStatus.EXTERNAL_BUSY, c.message
        sizes = [r['memory_rss'] for r in c.external_processes]
        assert sizes == sorted(sizes, reverse=True) and not set(c.external_pids) & {worker.pid, os.getpid()}
        assert rm.check_memory_availability(threshold_percent=80.0).status is ResourceStatus.AVAILABLE
    finally:
        worker.kill(); worker.wait()

def test_memory_threshold_is_validated():
    with pytest.raises(ValueError, match='threshold_percent'): ResourceManager().check_memory_availability(-1)
    with pytest.raises(ValueError, match='gpu_memory_threshold_percent'): ResourceManager(101)

# ----- plugged into BaseJobManager --------------------------------------------------------------------------
def test_plugs_into_base_job_manager(no_leftover_processes):
    from helpers import TextJobManager  # the suite's minimal BaseJobManager subclass

    rm = ResourceManager(nvml=FakeNVML([FakeNVML.gpu()]))
    async def main():
        m = TextJobManager('text', 'test', resource_manager=rm)
        try:
            job = await m.start_job('echo', text='hello')
            done = await m.wait_for_job(job.id, timeout=60)
            assert done.status == 'completed'
            deadline = time.monotonic() + 10
            while (w := rm.get_worker_by_pid(done.worker_pid)) is None or w.job_id is not None:
                assert time.monotonic() < deadline, w
                await asyncio.sleep(0.02)
            assert (w.worker_type, w.status) == ('text', 'idle')
            assert rm.get_worker_by_job(job.id) is None
        finally: m.shutdown()
        assert rm.get_all_workers() == []
    asyncio.run(asyncio.wait_for(main(), 120))

def test_cancel_is_no_warning(no_leftover_processes, caplog):
    "A cancel ends its worker, which reads see dead before the manager unregisters it: no warning for that."
    from helpers import TextJobManager
    rm, stop = ResourceManager(), threading.Event()
    def read():  # as a dashboard does, but all the time: into every window between a death and its unregister
        while not stop.is_set(): rm.get_all_workers(); time.sleep(0.002)
    async def main():
        m = TextJobManager('text', 'test', resource_manager=rm)
        try:
            for _ in range(4):
                job = await m.start_job('sleep', seconds=30)
                while m.get_job(job.id).status != 'running': await asyncio.sleep(0.01)
                assert await m.cancel_job(job.id)
                while m.get_workers_info()[0]['state'] != 'idle': await asyncio.sleep(0.01)
        finally: m.shutdown()
    reader = threading.Thread(target=read)
    with caplog.at_level(logging.DEBUG, logger=resources.__name__):
        reader.start()
        try: asyncio.run(asyncio.wait_for(main(), 120))
        finally: stop.set(); reader.join()
    said = [r.getMessage() for r in caplog.records if r.name == resources.__name__]
    assert not [r for r in caplog.records
                if r.name == resources.__name__ and r.levelno >= logging.WARNING], said
    assert rm.get_all_workers() == [] and rm._ended == {}

# ----- a real GPU -------------------------------------------------------------------------------------------
def real_gpu_manager():
    rm = ResourceManager()
    if not rm.gpu_available: pytest.skip(f"no NVIDIA GPU/driver: {rm.gpu_unavailable_reason}")
    return rm

# Holds GPU memory through the CUDA driver API (no framework needed), prints its pid once it holds it.
CUDA_HOLDER = r'''
import ctypes, os, sys, time
cuda = ctypes.CDLL('libcuda.so.1')
ctx, ptr = ctypes.c_void_p(), ctypes.c_void_p()
assert cuda.cuInit(0) == 0
assert cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, 0) == 0
assert cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(int(sys.argv[1]))) == 0
print(os.getpid(), flush=True)
time.sleep(60)
'''

@pytest.mark.gpu
def test_real_gpu_devices():
    rm = real_gpu_manager()
    gpus = rm.get_gpu_info()
    assert [g.index for g in gpus] == list(range(len(gpus)))
    for g in gpus:
        assert g.name and g.uuid.startswith(('GPU-', 'MIG-')) and g.memory_total > 0
        assert 0 <= g.memory_used <= g.memory_total and 0 <= g.memory_free <= g.memory_total
    c = rm.check_gpu_availability()
    assert len(c.devices) == len(gpus) and c.details['gpu_count'] == len(gpus)
    rm.close()

@pytest.mark.gpu
def test_real_gpu_app_and_external_processes(no_leftover_processes):
    rm = real_gpu_manager()
    gpu = rm.get_gpu_info()[0]
    # the external process takes half the device when there is room: above the 45% threshold
    big = gpu.memory_total // 2 if gpu.memory_free > 0.6 * gpu.memory_total else 256 << 20
    holders = [subprocess.Popen([sys.executable, '-c', CUDA_HOLDER, str(size)], stdout=subprocess.PIPE,
                                text=True)
               for size in (256 << 20, big)]
    try:
        pids = [int(h.stdout.readline() or 0) for h in holders]
        if not all(pids): pytest.skip("the CUDA driver API could not allocate memory here")
        app, external = pids
        rm.register_worker(app, 'gpu-worker')
        deadline = time.monotonic() + 10
        while True:
            seen = {p.pid for g in rm.get_gpu_info() for p in g.processes}
            if {app, external} <= seen: break
            if time.monotonic() > deadline:
                pytest.skip(f"NVML does not show this pid namespace's processes (sees {sorted(seen)})")
            time.sleep(0.2)
        c = rm.check_gpu_availability(device_index=0)
        assert app in c.app_pids and external in c.external_pids
        row = next(r for r in c.app_processes if r['pid'] == app)
        assert row['worker_pid'] == app and (row['gpu_memory'] is None or row['gpu_memory'] >= 256 << 20)
        if big > 256 << 20: assert c.status is ResourceStatus.EXTERNAL_BUSY, c.message
        else: assert c.status in (ResourceStatus.APP_BUSY, ResourceStatus.EXTERNAL_BUSY)  # a busy shared GPU
        assert c.details['external_memory'] >= big
    finally:
        for h in holders: h.kill(); h.wait(); h.stdout.close()
        rm.close()
