"base_worker_process in a real spawned subprocess over real queues: every request type, every way a job can end."
import multiprocessing, queue, signal, time, uuid
from multiprocessing.queues import SimpleQueue

import pytest

from cjm_fasthtml_workers.core.protocol import (
    WorkerRequest, WorkerRequestType as Req, WorkerResponse, WorkerResponseType as Resp, WorkerResult,
    WorkerStreamChunk, WorkerJobStarted, WorkerProgress, decode_message)
from cjm_fasthtml_workers.testing import PLUGIN_NAMES, scenario_worker_process, failing_init_worker_process

pytestmark = pytest.mark.timeout(60)
ctx = multiprocessing.get_context('spawn')
TIMEOUT = 10.0  # seconds any single message may take; a broken worker fails the test instead of hanging it


def get(q, timeout:float=TIMEOUT) -> dict:
    "Next item of `q`, a `Queue` or a `SimpleQueue` (which has no timeout of its own); `queue.Empty` after `timeout`."
    if not isinstance(q, SimpleQueue): return q.get(timeout=timeout)
    deadline = time.monotonic() + timeout
    while q.empty():
        if time.monotonic() > deadline: raise queue.Empty
        time.sleep(0.005)
    return q.get()


class WorkerUnderTest:
    "A spawned worker and its three queues, driven the way a manager drives them."
    def __init__(self, target=scenario_worker_process, queue_kind:str='Queue'):
        # the manager gives the worker SimpleQueues for results and responses; plain Queues are the spec's default
        make = getattr(ctx, queue_kind)
        self.request_queue, self.result_queue, self.response_queue = ctx.Queue(), make(), make()
        self.process = ctx.Process(target=target, args=(self.request_queue, self.result_queue, self.response_queue),
                                   daemon=True)
        self.process.start()

    def send(self, req_type:Req, request_id=None, **data):
        self.request_queue.put(WorkerRequest(req_type, data, request_id).to_dict())

    def result(self, timeout:float=TIMEOUT): return decode_message(get(self.result_queue, timeout))
    def response(self, timeout:float=TIMEOUT): return decode_message(get(self.response_queue, timeout))

    def init(self, **plugin_configs) -> WorkerResponse:
        self.send(Req.INIT, plugin_configs=plugin_configs)
        ready = self.result()
        assert isinstance(ready, WorkerResponse) and ready.type == Resp.READY, ready
        return ready

    def execute(self, plugin_name:str, stream:bool=False, **params) -> list:
        "Run one job; every message about it up to and including its `WorkerResult`."
        job_id = uuid.uuid4().hex
        self.send(Req.EXECUTE, job_id=job_id, plugin_name=plugin_name, params=params, stream=stream)
        msgs = [self.result()]
        while not isinstance(msgs[-1], WorkerResult): msgs.append(self.result())
        assert all(m.job_id == job_id for m in msgs), msgs
        return msgs

    def command(self, req_type:Req, **data) -> WorkerResponse:
        "Send a command with a fresh request id; its answer must carry that id."
        request_id = uuid.uuid4().hex
        self.send(req_type, request_id, **data)
        resp = self.response()
        assert resp.request_id == request_id, (resp, request_id)
        return resp

    def stop(self) -> WorkerResponse:
        self.send(Req.STOP)
        stopped = self.result()
        self.process.join(TIMEOUT)
        return stopped

    def close(self):
        "Kill the process if it still runs, reap it and release the queues."
        if self.process.is_alive(): self.process.kill()
        self.process.join(TIMEOUT)
        for q in (self.request_queue, self.result_queue, self.response_queue):
            q.close()
            if hasattr(q, 'join_thread'): q.join_thread()


@pytest.fixture(params=['Queue', 'SimpleQueue'])
def worker(request, no_leftover_processes):
    "A fresh scenario worker answering on either kind of queue; spawning one costs about 0.1 s, so each test gets its own."
    w = WorkerUnderTest(queue_kind=request.param)
    try: yield w
    finally: w.close()


def test_init_ready_and_stop(worker):
    ready = worker.init(echo={'prefix': '> '})
    assert ready.data['pid'] == worker.process.pid
    assert ready.data['plugins'] == PLUGIN_NAMES
    stopped = worker.stop()
    assert stopped.type == Resp.STOPPED and stopped.data['pid'] == worker.process.pid
    assert worker.process.exitcode == 0


def test_execute_started_then_result_and_plugin_reuse(worker):
    worker.init(echo={'prefix': '> '})
    started, result = worker.execute('echo', text='hi', extra=1)
    assert isinstance(started, WorkerJobStarted) and started.pid == worker.process.pid
    assert result.status == 'success' and result.error is None
    assert result.data == {'text': '> hi', 'params': {'extra': 1}}
    assert worker.execute('echo', text='again')[-1].data['text'] == '> again'
    # the second echo job reused the loaded plugin; switching plugins unloads the previous one first
    assert worker.execute('history')[-1].data['events'] == ['load echo', 'unload echo', 'load history']


def test_reload_unload_get_state_answer_their_request(worker):
    worker.init(echo={'prefix': '> '})
    worker.execute('echo', text='hi')
    state = worker.command(Req.GET_STATE)
    assert state.type == Resp.STATE and state.data['loaded_plugin'] == 'echo' and state.data['pid'] == worker.process.pid

    reload = worker.command(Req.RELOAD, plugin_name='echo', config={'prefix': '>> '})
    assert reload.type == Resp.RESPONSE and reload.data['success'] and reload.data['plugin_name'] == 'echo'
    assert worker.execute('echo', text='hi')[-1].data['text'] == '>> hi'

    refused = worker.command(Req.RELOAD, plugin_name='echo', config={'fail_load': True})
    assert refused.data['success'] is False and 'refused its configuration' in refused.data['error']

    unload = worker.command(Req.UNLOAD, plugin_name='echo')
    assert unload.type == Resp.RESPONSE and unload.data['success']
    assert worker.command(Req.GET_STATE).data['loaded_plugin'] is None


def test_commands_sent_together_are_answered_in_order_with_their_ids(worker):
    worker.init()
    ids = [uuid.uuid4().hex for _ in range(3)]
    for i in ids: worker.send(Req.GET_STATE, i)
    assert [worker.response().request_id for _ in ids] == ids


def test_plugin_exception_fails_the_job_and_worker_runs_the_next(worker):
    worker.init()
    started, result = worker.execute('fail', message='boom')
    assert isinstance(started, WorkerJobStarted)
    assert result.status == 'error' and result.data is None
    assert result.error == 'RuntimeError: boom'
    assert 'Traceback' in result.traceback and 'RuntimeError: boom' in result.traceback
    assert 'execute_plugin' in result.traceback  # the plugin's own frame, not only the worker's
    assert worker.execute('echo', text='still up')[-1].data['text'] == 'still up'


def test_unknown_plugin_and_execute_before_init_are_job_errors(worker):
    before = worker.execute('echo', text='too early')[-1]
    assert before.status == 'error' and 'not initialised' in before.error
    worker.init()
    unknown = worker.execute('no-such-plugin')[-1]
    assert unknown.status == 'error' and unknown.error.startswith('ValueError') and 'no-such-plugin' in unknown.error
    assert worker.execute('echo', text='ok')[-1].status == 'success'


def test_malformed_request_reports_error_and_worker_stays_up(worker):
    worker.init()
    bad = WorkerRequest(Req.GET_STATE, request_id='bad').to_dict()
    bad['type'] = 'no-such-request'
    worker.request_queue.put(bad)
    err = worker.result()
    assert err.type == Resp.ERROR and 'no-such-request' in err.data['error']
    assert worker.command(Req.GET_STATE).type == Resp.STATE


def test_unpicklable_result_becomes_error_result(worker):
    worker.init()
    started, result = worker.execute('unpicklable')
    assert isinstance(started, WorkerJobStarted)
    assert result.status == 'error' and started.job_id in result.error and 'pickle' in result.error
    assert worker.execute('echo', text='next')[-1].data['text'] == 'next'
    assert worker.stop().type == Resp.STOPPED and worker.process.exitcode == 0


def test_streaming_sends_chunks_in_order_then_final_then_result(worker):
    worker.init()
    msgs = worker.execute('stream', stream=True, text='one two three', delay=0.01)
    started, *chunks, final, result = msgs
    assert isinstance(started, WorkerJobStarted)
    assert all(isinstance(c, WorkerStreamChunk) and not c.is_final for c in chunks)
    assert [c.chunk for c in chunks] == ['one ', 'two ', 'three']
    assert isinstance(final, WorkerStreamChunk) and final.is_final and final.chunk == ''
    assert result.status == 'success' and result.data['text'] == 'one two three'
    # without stream=True the same plugin answers with one result and no chunks
    assert [type(m) for m in worker.execute('stream', text='a b')] == [WorkerJobStarted, WorkerResult]


def test_progress_reports_arrive_in_order_with_values(worker):
    worker.init()
    started, *reports, result = worker.execute('progress', steps=4, seconds=0.02)
    assert isinstance(started, WorkerJobStarted) and result.status == 'success'
    assert all(isinstance(r, WorkerProgress) for r in reports)
    assert [r.progress for r in reports] == [0.25, 0.5, 0.75, 1.0]
    assert [r.message for r in reports] == [f'step {i} of 4' for i in range(1, 5)]


@pytest.mark.parametrize('plugin,params,exitcode', [
    ('exit', {'code': 3}, 3),
    ('kill', {}, -signal.SIGKILL),
    ('segv', {}, -signal.SIGSEGV),
], ids=['os._exit(3)', 'SIGKILL', 'SIGSEGV'])
def test_worker_death_is_seen_as_its_exit_code(no_leftover_processes, plugin, params, exitcode):
    # SimpleQueue, as the manager uses: a Queue's feeder thread dies with the process and may lose JOB_STARTED
    w = WorkerUnderTest(queue_kind='SimpleQueue')
    try:
        w.init()
        job_id = uuid.uuid4().hex
        w.send(Req.EXECUTE, job_id=job_id, plugin_name=plugin, params=params)
        started = w.result()
        assert isinstance(started, WorkerJobStarted) and started.job_id == job_id
        w.process.join(TIMEOUT)
        assert w.process.exitcode == exitcode
        with pytest.raises(queue.Empty): w.result(timeout=0.2)  # no result and no STOPPED: a death, not an exit
    finally: w.close()


def test_failing_init_reports_error_and_exits_nonzero(no_leftover_processes):
    w = WorkerUnderTest(target=failing_init_worker_process)
    try:
        w.send(Req.INIT, plugin_configs={})
        err = w.result()
        assert err.type == Resp.ERROR
        assert err.data['error'] == 'BrokenPluginManagerError: plugin manager could not be created'
        assert 'broken_plugin_manager' in err.data['traceback']
        w.process.join(TIMEOUT)
        assert w.process.exitcode == 1  # the INIT exception ends the process, as any uncaught exception in it would
    finally: w.close()
