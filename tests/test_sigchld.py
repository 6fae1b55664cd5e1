"""An app that ignores SIGCHLD (some servers do): the system reaps its children at once, so no exit status can
be collected (waitpid fails with ECHILD). A worker killed there ended; what is said must be what is known."""
import asyncio, signal, time, uuid
from dataclasses import dataclass, field
from typing import Any, Dict

import pytest

from cjm_fasthtml_workers.backends.process import ProcessWorker, describe_exit
from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
from cjm_fasthtml_workers.core.protocol import WorkerRequest, WorkerRequestType
from cjm_fasthtml_workers.managers.base import BaseJob, BaseJobManager
from cjm_fasthtml_workers.testing import scenario_worker_process

@pytest.fixture
def sigchld_ignored():
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGCHLD, previous)

@dataclass
class Job(BaseJob):
    params: Dict[str, Any] = field(default_factory=dict)

class Manager(BaseJobManager[Job]):
    def create_job(self, plugin_id, **kwargs): return Job(id=uuid.uuid4().hex, plugin_id=plugin_id,
                                                          params=kwargs)
    def get_worker_entry_point(self): return scenario_worker_process
    def prepare_execute_request(self, job): return job.params
    def extract_job_result(self, job, result_data): return result_data

def test_process_worker_reaped_by_the_system(no_leftover_processes, sigchld_ignored):
    w = ProcessWorker(scenario_worker_process, 'sigchld-worker')
    w.start()
    try:
        w.kill()
        deadline = time.monotonic() + 10
        while w.alive() and time.monotonic() < deadline: time.sleep(0.01)
        assert w.reap(timeout=5.0) is None and not w.alive() and w.death_fd is None
        assert describe_exit(w.exitcode, ended=not w.alive()) == \
            'worker ended; its exit status is unknown because the app ignores SIGCHLD'
    finally: w.close()

def test_killed_workers_job_says_what_is_known(no_leftover_processes, sigchld_ignored):
    async def main():
        m = Manager('sigchld', 'test', worker_config=WorkerConfig(restart_policy=RestartPolicy.ALWAYS))
        try:
            job = await m.start_job('sleep', seconds=30)
            deadline = time.monotonic() + 20
            while m.get_job(job.id).status != 'running':
                assert time.monotonic() < deadline, "the job did not start"
                await asyncio.sleep(0.02)
            m.worker_process.kill()
            while m.get_job(job.id).status == 'running':
                assert time.monotonic() < deadline, "the killed worker's job did not end"
                await asyncio.sleep(0.02)
            job = m.get_job(job.id)
            assert job.status == 'failed' and 'did not exit' not in job.error, job.error
            assert 'ended; its exit status is unknown because the app ignores SIGCHLD' in job.error, job.error
            after = await m.start_job('echo', text='after')  # the restarted worker serves the next job
            while m.get_job(after.id).status in ('pending', 'running'):
                assert time.monotonic() < deadline + 20, "the next job did not end"
                await asyncio.sleep(0.02)
            assert m.get_job(after.id).status == 'completed', m.get_job(after.id).error
        finally: m.shutdown()
    asyncio.run(asyncio.wait_for(main(), 60))
