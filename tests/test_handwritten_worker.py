"""A worker entry point written by hand to the documented protocol, with its own loop, on our manager.

`testing.handwritten_worker_process` calls what user code calls on a `multiprocessing.Queue`:
`get(timeout=1.0)` with `queue.Empty`, `get_nowait()`, `put(..., timeout=...)`, `put_nowait()`, `empty()`,
`qsize()`, `close()`, `join_thread()`, `cancel_join_thread()`. The three objects our worker process gives it
must take all of them."""
import asyncio, queue, threading, time, uuid
from dataclasses import dataclass, field
from typing import Any, Dict

import pytest

from cjm_fasthtml_workers.core.config import WorkerConfig
from cjm_fasthtml_workers.core.worker import PipeEnd
from cjm_fasthtml_workers.managers.base import BaseJob, BaseJobManager
from cjm_fasthtml_workers.testing import handwritten_worker_process

@dataclass
class HandJob(BaseJob):
    params: Dict[str, Any] = field(default_factory=dict)

class HandwrittenManager(BaseJobManager[HandJob]):
    def create_job(self, plugin_id, **kwargs): return HandJob(id=uuid.uuid4().hex, plugin_id=plugin_id,
                                                              params=kwargs)
    def get_worker_entry_point(self): return handwritten_worker_process
    def prepare_execute_request(self, job): return job.params
    def extract_job_result(self, job, result_data): return result_data

async def finished(m, job, timeout=30.0):
    "Wait until `job` has ended; fail saying which job did not."
    deadline = time.monotonic() + timeout
    while m.get_job(job.id).status in ('pending', 'running'):
        assert time.monotonic() < deadline, f"job {job.id} ({job.plugin_id}) did not end within {timeout} s"
        await asyncio.sleep(0.02)
    return m.get_job(job.id)

@pytest.mark.parametrize('n', [1, 2])
def test_handwritten_worker_runs_jobs_reload_unload(no_leftover_processes, n):
    async def main():
        m = HandwrittenManager('hand', 'test', worker_config=WorkerConfig(max_workers=n))
        try:
            jobs = [await m.start_job('echo', text=f'job {i}') for i in range(2 * n + 1)]
            done = [await finished(m, j) for j in jobs]
            assert [j.status for j in done] == ['completed'] * len(jobs), [(j.status, j.error) for j in done]
            assert [j.result['text'] for j in done] == [f'job {i}' for i in range(len(jobs))]
            failed = await finished(m, await m.start_job('fail', message='boom'))
            assert failed.status == 'failed' and 'boom' in failed.error
            assert await m.reload_plugin('echo', {'prefix': '> '}) is True
            again = await finished(m, await m.start_job('echo', text='again'))
            assert again.status == 'completed' and again.result['text'] == '> again', again.error
            assert await m.unload_plugin('echo') is True
            assert all(r['alive'] for r in m.get_workers_info()), m.get_workers_info()
            assert m.restart_count == 0  # no worker died on the way
        finally: m.shutdown()
        assert all(r['last_exit'] is None or 'code 0' in r['last_exit'] for r in m.get_workers_info())
    asyncio.run(asyncio.wait_for(main(), 90))

def test_pipe_end_is_a_queue():
    "What `multiprocessing.Queue` offers user code, on our pipe ends: timeouts, no-wait calls, counts, close."
    import multiprocessing.connection
    r, w = multiprocessing.connection.Pipe(duplex=False)
    reader, writer = PipeEnd(reader=r), PipeEnd(writer=w)
    with pytest.raises(queue.Empty): reader.get(timeout=0.05)
    with pytest.raises(queue.Empty): reader.get(block=False)
    with pytest.raises(queue.Empty): reader.get_nowait()
    assert reader.empty() and writer.empty() and reader.qsize() == writer.qsize() == 0 and not writer.full()
    writer.put({'n': 1}, timeout=1.0); writer.put_nowait({'n': 2}); writer.put({'n': 3}, block=False)
    assert writer.qsize() == 3 and not writer.empty()
    assert reader.qsize() == 3 and not reader.empty()
    assert reader.get(timeout=1.0) == {'n': 1}
    assert writer.qsize() == 0 and reader.qsize() == 2  # the reader read them out of the pipe
    assert reader.get_nowait() == {'n': 2} and reader.get(block=False) == {'n': 3}
    assert reader.empty() and reader.qsize() == 0
    threading.Timer(0.1, writer.put, args=({'n': 4},)).start()
    assert reader.get(timeout=5.0) == {'n': 4}  # a get with a timeout waits for what comes
    writer.close(); writer.join_thread(); reader.cancel_join_thread()
    with pytest.raises(ValueError, match='closed'): writer.put({'n': 5})
    with pytest.raises(EOFError): reader.get(timeout=1.0)  # the writer is gone
    reader.close()
    with pytest.raises(ValueError, match='closed'): reader.get()
