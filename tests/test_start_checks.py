"""What a manager tells a user at its first start: GPUs asked for on a machine without any, preload_plugins
that name no plugin, and a second process of the same app (`uvicorn app:app --workers 2`) running the same
manager."""
import asyncio, logging, os, select, subprocess, sys, textwrap, time
from pathlib import Path

import pytest

from cjm_fasthtml_workers.core.config import WorkerConfig
from cjm_fasthtml_workers.extensions.resources import FakeNVML, NVMLSession, ResourceManager
from helpers import TextJobManager, finish, readme_app, run, until

# ----- gpus= on a machine without an NVIDIA GPU -----------------------------------------------------------
def _start_fails(m) -> str:
    "The error of `m.start()`, which must fail; `m` is shut down after."
    async def main():
        try:
            with pytest.raises(RuntimeError) as e: await m.start()
            assert all(r['pid'] is None for r in m.get_workers_info())  # nothing started
            return str(e.value)
        finally: m.shutdown()
    return run(main())

@pytest.mark.parametrize('gpus', ['auto', [0]])
def test_no_gpu_says_so_at_start(no_leftover_processes, gpus):
    rm = ResourceManager(nvml=FakeNVML(init_error='Driver Not Loaded'))
    config = WorkerConfig(max_workers=2, gpus=gpus)
    m = TextJobManager('text', 'test', resource_manager=rm, worker_config=config)
    error = _start_fails(m)
    assert 'no NVIDIA GPU was found (NVML could not be initialised: Driver Not Loaded)' in error, error
    assert 'Use WorkerConfig(gpus=None) to run the workers without pinning' in error, error

def test_no_gpu_without_a_resource_manager(no_leftover_processes):
    "Without a resource manager the manager asks NVML itself, and says what NVML said."
    found, reason = NVMLSession().probe()
    if found: pytest.skip(f"this machine has {len(found)} NVIDIA GPU(s): nothing to say")
    config = WorkerConfig(max_workers=2, gpus='auto')
    error = _start_fails(TextJobManager('text', 'test', worker_config=config))
    assert f'no NVIDIA GPU was found ({reason})' in error and 'gpus=None' in error, error

# ----- preload_plugins naming no plugin -------------------------------------------------------------------
def test_unknown_preload_is_said_once(no_leftover_processes, caplog, capfd):
    "Two workers, then a replacement: one warning from the manager; no worker asked to load what it has not."
    caplog.set_level(logging.WARNING, logger='cjm_fasthtml_workers')
    async def main():
        config = WorkerConfig(max_workers=2, preload_plugins=['whisper'])
        m = TextJobManager('text', 'test', worker_config=config)
        try:
            await m.start()
            jobs = [await m.start_job('sleep', seconds=0.3) for _ in range(2)]  # one on each worker
            assert {(await finish(m, j)).worker_pid for j in jobs} == {r['pid'] for r in m.get_workers_info()}
            hang = await m.start_job('hang')  # a replacement worker is ready again
            await until('the hang job runs', lambda: hang.status == 'running')
            await m.cancel_job(hang.id)
            await until('a replacement worker idle',
                        lambda: all(r['state'] == 'idle' and r['pid'] for r in m.get_workers_info())
                        and hang.worker_pid not in {r['pid'] for r in m.get_workers_info()})
            done = await finish(m, await m.start_job('sleep', seconds=0.05))
            assert done.status == 'completed'
            assert [r['loaded_plugin'] for r in m.get_workers_info()].count(None) >= 1
        finally: m.shutdown()
    run(main())
    said = [r.getMessage() for r in caplog.records if 'whisper' in r.getMessage()]
    assert len(said) == 1, said
    assert 'preload_plugins names whisper, which the workers do not have: not preloaded' in said[0], said
    assert 'The plugins are: alien, ' in said[0] and 'echo' in said[0], said  # the plugins there are
    err = capfd.readouterr().err  # what the workers wrote on the inherited stderr
    assert 'reload of plugin whisper failed' not in err, err

# ----- two processes of one app ---------------------------------------------------------------------------
APP = '''
import asyncio, logging, os, sys, uuid
from dataclasses import dataclass, field
from cjm_fasthtml_workers.managers.base import BaseJob, BaseJobManager
from cjm_fasthtml_workers.core.config import WorkerConfig
from cjm_fasthtml_workers.testing import scenario_worker_process

@dataclass
class TextJob(BaseJob):
    params: dict = field(default_factory=dict)

class TextJobManager(BaseJobManager):
    def create_job(self, plugin_id, **kwargs):
        return TextJob(id=uuid.uuid4().hex, plugin_id=plugin_id, params=kwargs)
    def get_worker_entry_point(self): return scenario_worker_process
    def prepare_execute_request(self, job): return job.params
    def extract_job_result(self, job, result_data): return result_data

async def main():
    manager = TextJobManager(os.environ['WORKER_TYPE'], 'demo', worker_config=WorkerConfig(max_workers=2))
    try:
        await manager.start()
        print('started', flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # until the test closes stdin
    finally: manager.shutdown()

if __name__ == '__main__':
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
'''
TWICE = 'another process of this app'

class App:
    "One app process (app.py in `cwd`), started and waited for until its manager has started."
    def __init__(self, cwd:Path, name:str, worker_type:str):
        self.log = cwd/f'{name}.log'
        with open(self.log, 'w') as log:
            self.proc = subprocess.Popen([sys.executable, 'app.py'], cwd=cwd, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True,
                                         env={**os.environ, 'WORKER_TYPE': worker_type})
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ''
        assert line == 'started\n', f"{name} did not start: {line!r}\n{self.log.read_text()}"

    def stop(self) -> str:
        "Stop it; what it logged."
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try: self.proc.wait(20)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        self.proc.stdout.close()
        return self.log.read_text()

def test_a_second_app_process_is_told(tmp_path, no_leftover_processes):
    "The second process of one app warns once, naming the first; another worker_type and a restart do not."
    (tmp_path/'app.py').write_text(APP)
    kind, apps = f'twice{os.getpid()}', []
    try:
        apps.append(first := App(tmp_path, 'first', kind))  # a pool of 2: its workers start no manager
        apps.append(second := App(tmp_path, 'second', kind))
        apps.append(other := App(tmp_path, 'other', kind + 'other'))
        logs = {a: a.stop() for a in (second, other, first)}
        assert logs[second].count(TWICE) == 1, logs[second]
        said = next(l for l in logs[second].splitlines() if TWICE in l)
        assert f'(pid {first.proc.pid})' in said and f"'{kind}' job manager" in said, said
        assert 'uvicorn app:app --workers 1' in said and 'its own worker_type' in said, said
        assert TWICE not in logs[first] and TWICE not in logs[other], (logs[first], logs[other])
        apps.append(restarted := App(tmp_path, 'restarted', kind))  # the first has ended: no second app
        assert TWICE not in restarted.stop()
    finally:
        for a in apps: a.stop()
    from cjm_fasthtml_workers.managers.base import _private_dir
    assert not [f for f in os.listdir(_private_dir()) if f.startswith(kind)]  # each removed its lock at exit

def test_uvicorn_workers_2_with_the_readme_app(tmp_path, no_leftover_processes):
    "The case the check is for: the README's app under `uvicorn app:app --workers 2` says so, once."
    from conftest import free_port, kill_tree, start_web_app
    (tmp_path/'app.py').write_text(readme_app())
    port = free_port()
    proc = start_web_app([sys.executable, '-m', 'uvicorn', 'app:app', '--port', str(port), '--workers', '2'],
                         tmp_path, port, dict(os.environ), timeout=60)
    log = tmp_path/'app.log'
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count('Application startup complete') < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(2)  # Ctrl+C
        proc.wait(20)
    finally: kill_tree(proc)
    text = log.read_text()
    assert text.count('Application startup complete') == 2, text
    assert text.count(TWICE) == 1 and 'uvicorn app:app --workers 1' in text, text
