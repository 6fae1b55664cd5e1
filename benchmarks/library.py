"""The library's side of each shape: the work of benchmarks/floor.py, done through a `BaseJobManager`.

The manager is the one of tests/test_manager.py, running the package's scenario plugins (`echo`, `sleep`,
`hang`). It lives only in the benchmark's process; its worker imports `cjm_fasthtml_workers.testing` by name.
The affinity shape's manager runs `CountingPluginManager` instead, whose workers import this module by
name."""
import asyncio, gc, os, signal, tempfile, time, uuid
from dataclasses import dataclass, field
from typing import Any, Dict

import psutil
from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
from cjm_fasthtml_workers.core.worker import base_worker_process
from cjm_fasthtml_workers.managers.base import BaseJob, BaseJobManager
from cjm_fasthtml_workers.testing import ScenarioPluginManager, scenario_worker_process

@dataclass
class TextJob(BaseJob):
    params: Dict[str, Any] = field(default_factory=dict)  # keyword arguments for the plugin

class TextJobManager(BaseJobManager[TextJob]):
    def create_job(self, plugin_id, **kwargs):
        return TextJob(id=uuid.uuid4().hex, plugin_id=plugin_id, params=kwargs)
    def get_worker_entry_point(self): return scenario_worker_process
    def prepare_execute_request(self, job): return job.params
    def extract_job_result(self, job, result_data): return result_data

def make(policy:RestartPolicy=RestartPolicy.ON_CANCELLATION, kind=TextJobManager, **cfg) -> TextJobManager:
    return kind('bench', 'bench', worker_config=WorkerConfig(restart_policy=policy, **cfg))

# A worker's loads, counted where they happen: spawned workers inherit os.environ, so the log path gets there
LOAD_LOG = 'CJM_BENCH_LOAD_LOG'

class CountingPluginManager(ScenarioPluginManager):
    ("The scenario plugins; every load appends a line `<pid> <plugin>` to the file named by "
     "$CJM_BENCH_LOAD_LOG.")
    def load_plugin(self, plugin_data, config):
        super().load_plugin(plugin_data, config)
        with open(os.environ[LOAD_LOG], 'a') as f: f.write(f"{os.getpid()} {plugin_data['name']}\n")

def counting_worker_process(request_queue, result_queue, response_queue):
    "Worker entry point running `CountingPluginManager` plugins."
    base_worker_process(request_queue, result_queue, response_queue, CountingPluginManager,
                        supports_streaming=True)

class CountingJobManager(TextJobManager):
    def get_worker_entry_point(self): return counting_worker_process

def _check(job, status='completed'):
    if job.status != status:
        raise RuntimeError(f"job {job.id} ({job.plugin_id}) is {job.status}, not {status}: {job.error}")
    return job

async def echo(m, text:str='x') -> TextJob:
    "Run one echo job to its end."
    job = await m.start_job('echo', text=text)
    return _check(await m.wait_for_job(job.id))

async def running(m, plugin_id:str='hang', timeout:float=30.0) -> TextJob:
    "Start a job and wait until the worker has started it."
    job, deadline = await m.start_job(plugin_id), time.monotonic() + timeout
    while job.status != 'running':
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job.id} did not start within {timeout} s ({job.status})")
        await asyncio.sleep(0.001)
    return job

class Ticker:
    "A 1 ms asyncio ticker; `stall` is its longest gap less the 1 ms it sleeps, the gap to its exit included."
    def __init__(self): self.gaps, self.task, self.last = [], None, None
    async def __aenter__(self):
        self.last = time.perf_counter()
        self.task = asyncio.create_task(self._tick())
        return self
    async def __aexit__(self, *exc):
        self.gaps.append(time.perf_counter() - self.last)  # a loop blocked until now never let it tick again
        self.task.cancel()
        try: await self.task
        except asyncio.CancelledError: pass
    async def _tick(self):
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.gaps.append(now - self.last)
            self.last = now
    @property
    def stall(self) -> float: return max(0.0, max(self.gaps) - 0.001)

# ----- shapes -----------------------------------------------------------------------------------------------
async def round_trips(m, n:int, text:str='x') -> list: # Seconds of each of `n` sequential jobs
    "`start_job` then `wait_for_job`, `n` times."
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        job = await m.start_job('echo', text=text)
        await m.wait_for_job(job.id)
        out.append(time.perf_counter() - t0)
        _check(job)
    m.clear_completed_jobs()
    return out

async def bytes_round_trip(m, size:int) -> tuple: # (seconds, longest event-loop stall in seconds)
    "One echo job whose argument is `size` bytes and whose result holds them again, with a ticker running."
    blob = b'x' * size
    async with Ticker() as ticker:
        t0 = time.perf_counter()
        job = await m.start_job('echo', data=blob)
        await m.wait_for_job(job.id)
        seconds = time.perf_counter() - t0
    if _check(job).result['params']['data'] != blob: raise RuntimeError("the echoed bytes differ")
    m.clear_completed_jobs()
    return seconds, ticker.stall

async def submit_all(m, n:int) -> list: # The `n` jobs, all ended
    "Submit `n` echo jobs back to back, then wait until all have ended."
    jobs = []
    for _ in range(n):
        jobs.append(await m.start_job('echo', text='x'))
        await asyncio.sleep(0)  # each submission its own turn of the loop, as an app's requests are
    await m.wait_for_job(jobs[-1].id)  # one worker runs jobs in submission order: the last ends last
    return jobs

async def throughput(m, n:int) -> tuple: # (jobs per second, longest event-loop stall in seconds)
    "Jobs per second for `n` jobs submitted back to back, with a ticker running throughout."
    async with Ticker() as ticker:
        t0 = time.perf_counter()
        jobs = await submit_all(m, n)
        seconds = time.perf_counter() - t0
    for j in jobs: _check(j)
    m.clear_completed_jobs()
    return n / seconds, ticker.stall

async def idle_stall(seconds:float) -> float: # Longest stall of the ticker on an idle loop: its noise floor
    async with Ticker() as ticker: await asyncio.sleep(seconds)
    return ticker.stall

async def cancel_to_ready(m) -> tuple: # (seconds, longest event-loop stall in seconds)
    "Cancel a running job, then run the next job to its result: the worker is replaced in between."
    job = await running(m)
    # the kill path, as the documented system cancels (benchmarks/cancel.py measures a job asked to stop)
    grace, m.worker_config.cancel_grace_seconds = m.worker_config.cancel_grace_seconds, 0.0
    try:
        async with Ticker() as ticker:
            t0 = time.perf_counter()
            if not await m.cancel_job(job.id): raise RuntimeError("cancel_job refused a running job")
            await echo(m)
            seconds = time.perf_counter() - t0
    finally: m.worker_config.cancel_grace_seconds = grace
    _check(job, 'cancelled')
    return seconds, ticker.stall

async def command_stall(m, command:str) -> float: # Longest event-loop stall in seconds
    "Reload or unload the echo plugin with a ticker running."
    async with Ticker() as ticker:
        if command == 'reload': ok = await m.reload_plugin('echo', {'prefix': ''})
        else: ok = await m.unload_plugin('echo')
    if not ok: raise RuntimeError(f"{command} of the echo plugin failed")
    return ticker.stall

async def cold_start() -> tuple: # (seconds from `start()` to the 1st result, seconds to shut down when idle)
    "A fresh manager: `start()`, the first job's result, then `shutdown()` once it is idle."
    t0 = time.perf_counter()
    m = make()
    await m.start()
    await echo(m)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.shutdown()
    return cold, time.perf_counter() - t0

async def crash_detection(m) -> float: # Seconds from SIGKILL until the job is failed
    "SIGKILL the worker during a job; `m` restarts it (`RestartPolicy.ALWAYS`), ready for the next sample."
    job = await running(m)
    ended = asyncio.ensure_future(m.wait_for_job(job.id))
    await asyncio.sleep(0)  # the waiter is registered before the kill
    t0 = time.perf_counter()
    os.kill(job.worker_pid, signal.SIGKILL)
    await ended
    seconds = time.perf_counter() - t0
    _check(job, 'failed')
    await m.start()
    return seconds

async def memory(m, n:int, rss) -> tuple: # (bytes per job once cleared, bytes per job while kept)
    "Parent RSS growth per job over `n` jobs cleared as they go, then over `n` jobs kept in `m.jobs`."
    batch = min(n, 500)
    await submit_all(m, batch)  # warm: queues, buffers and caches reach their working size
    m.clear_completed_jobs()
    gc.collect()
    before = rss()
    for _ in range(n // batch):  # an app that clears finished jobs: whatever grows here is a leak
        await submit_all(m, batch)
        m.clear_completed_jobs()
    gc.collect()
    cleared, before = (rss() - before) / n, rss()
    await submit_all(m, n)  # an app that keeps every job: the cost of a job record
    gc.collect()
    kept = (rss() - before) / n
    m.clear_completed_jobs()
    return cleared, kept

async def sleeps(m, n:int, seconds:float) -> float: # Seconds from the first submission to the last result
    ("Submit `n` jobs that sleep `seconds` each, then wait until all have ended: "
     "the pool runs them side by side.")
    t0 = time.perf_counter()
    jobs = [await m.start_job('sleep', seconds=seconds) for _ in range(n)]
    for j in jobs: _check(await m.wait_for_job(j.id))
    seconds = time.perf_counter() - t0
    m.clear_completed_jobs()
    return seconds

async def pool_start(n:int) -> tuple: # (seconds `start()` takes, the started manager)
    "A fresh manager of `n` workers: `start()` until every worker is ready."
    m = make(max_workers=n)
    t0 = time.perf_counter()
    await m.start()
    return time.perf_counter() - t0, m

async def model_loads(workers:int, n:int, pairs:bool=True) -> int: # Plugin loads in all workers together
    ("`n` jobs alternating between the echo and sleep plugins on a fresh pool: "
     "two at a time (`pairs`), or all at once.")
    fd, path = tempfile.mkstemp(prefix='cjm-bench-loads-')
    os.close(fd)
    os.environ[LOAD_LOG] = path
    m = make(kind=CountingJobManager, max_workers=workers)
    try:
        await m.start()
        plugins, step = ['echo', 'sleep'] * (n // 2), 2 if pairs else n
        for i in range(0, n, step):
            batch = [await m.start_job(p) for p in plugins[i:i + step]]
            for j in batch: _check(await m.wait_for_job(j.id))
        with open(path) as f: return len(f.read().splitlines())
    finally:
        m.shutdown()
        del os.environ[LOAD_LOG]
        os.unlink(path)

def memory_probe(n:int, conn):
    ("Spawned by the benchmark: `memory` in a process of its own, on a heap no other shape has grown; "
     "sends the result on `conn`.")
    me = psutil.Process()
    async def main():
        m = make()
        try:
            await m.start()
            return await memory(m, n, lambda: me.memory_info().rss)
        finally: m.shutdown()
    conn.send(asyncio.run(main()))

async def burst(m, n:int) -> tuple: # (longest event-loop stall in seconds during the burst, seconds to the last result)
    "`n` `start_job` calls from one coroutine, back to back with no await between them that suspends; then the last."
    async with Ticker() as ticker:
        t0 = time.perf_counter()
        jobs = [await m.start_job('echo', text='x') for _ in range(n)]
    await m.wait_for_job(jobs[-1].id)
    seconds = time.perf_counter() - t0
    for j in jobs: _check(j)
    m.clear_completed_jobs()
    return ticker.stall, seconds

class CountingBroadcaster:
    "A broadcaster that keeps up: it counts events and chunks, and notes when a job's end arrives."
    def __init__(self): self.events, self.chunks, self.ended = 0, 0, {}
    async def broadcast(self, event:str, data:dict):
        self.events += 1
        if event.endswith(':chunk'): self.chunks += len(data['chunk'].split())  # joined chunks count one by one
        elif event.endswith((':completed', ':failed', ':cancelled')) and (f := self.ended.get(data['job_id'])):
            f.set_result(time.perf_counter())

async def event_rate(n:int) -> tuple: # (events per second, chunks per second, events coalesced)
    "A streaming job of `n` one-word chunks to a broadcaster that only counts: from `start_job` to its end event."
    b = CountingBroadcaster()
    m = TextJobManager('bench', 'bench', worker_config=WorkerConfig(), supports_streaming=True, event_broadcaster=b)
    text = ' '.join(['x'] * n)
    try:
        await m.start()
        _check(await m.wait_for_job((await m.start_job('stream', text='a b', stream=True)).id))  # plugin loaded
        await asyncio.sleep(0.05)
        b.events = b.chunks = 0
        t0 = time.perf_counter()
        job = await m.start_job('stream', text=text, stream=True)
        b.ended[job.id] = asyncio.get_running_loop().create_future()
        t1 = await asyncio.wait_for(b.ended[job.id], 120)
        _check(job)
        if b.chunks != n: raise RuntimeError(f"{b.chunks} chunks of {n} reached the broadcaster")
        return b.events / (t1 - t0), b.chunks / (t1 - t0), m._events.coalesced
    finally: m.shutdown()
