("base_worker_process in a real spawned subprocess over real queues: every request type, "
 "every way a job can end.")
import functools, multiprocessing, queue, signal, time, uuid
from multiprocessing.queues import SimpleQueue

import pytest

from cjm_fasthtml_workers.core.protocol import (
    WorkerRequest, WorkerRequestType as Req, WorkerResponse, WorkerResponseType as Resp, WorkerResult,
    WorkerStreamChunk, WorkerJobStarted, WorkerProgress, decode_message)
from cjm_fasthtml_workers.core.worker import base_worker_process
from cjm_fasthtml_workers.testing import (
    PLUGIN_NAMES, ScenarioPluginManager, scenario_worker_process, failing_init_worker_process)

pytestmark = pytest.mark.timeout(60)
ctx = multiprocessing.get_context('spawn')
TIMEOUT = 10.0  # seconds any single message may take; a broken worker fails the test instead of hanging it


def get(q, timeout:float=TIMEOUT) -> dict:
    ("Next item of `q`, a `Queue` or a `SimpleQueue` (which has no timeout of its own); "
     "`queue.Empty` after `timeout`.")
    if not isinstance(q, SimpleQueue): return q.get(timeout=timeout)
    deadline = time.monotonic() + timeout
    while q.empty():
        if time.monotonic() > deadline: raise queue.Empty
        time.sleep(0.005)
    return q.get()


class WorkerUnderTest:
    "A spawned worker and its three queues, driven the way a manager drives them."
    def __init__(self, target=scenario_worker_process, queue_kind:str='Queue'):
        # the manager gives the worker SimpleQueues for results and responses; plain Queues are the spec's
        # default
        make = getattr(ctx, queue_kind)
        self.request_queue, self.result_queue, self.response_queue = ctx.Queue(), make(), make()
        self.process = ctx.Process(target=target,
                                   args=(self.request_queue, self.result_queue, self.response_queue),
                                   daemon=True)
        self.process.start()

    def send(self, req_type:Req, request_id=None, **data):
        self.request_queue.put(WorkerRequest(req_type, data, request_id).to_dict())

    def raw_result(self, timeout:float=TIMEOUT) -> dict: return get(self.result_queue, timeout)
    def result(self, timeout:float=TIMEOUT): return decode_message(self.raw_result(timeout))
    def response(self, timeout:float=TIMEOUT): return decode_message(get(self.response_queue, timeout))

    def init(self, **plugin_configs) -> WorkerResponse:
        self.send(Req.INIT, plugin_configs=plugin_configs)
        ready = self.result()
        assert isinstance(ready, WorkerResponse) and ready.type == Resp.READY, ready
        return ready

    def execute_raw(self, plugin_name:str, stream:bool=False, **params) -> list:
        "Run one job, sent as the documented flat EXECUTE; every message dict about it up to its RESULT."
        job_id = uuid.uuid4().hex
        self.send(Req.EXECUTE, job_id=job_id, plugin_name=plugin_name, stream=stream, **params)
        msgs = [self.raw_result()]
        while msgs[-1]['type'] != Resp.RESULT.value: msgs.append(self.raw_result())
        assert all(m['job_id'] == job_id for m in msgs), msgs
        return msgs

    def execute(self, plugin_name:str, stream:bool=False, **params) -> list:
        "Run one job; every typed message about it up to and including its `WorkerResult`."
        return [decode_message(m) for m in self.execute_raw(plugin_name, stream, **params)]

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
    ("A fresh scenario worker answering on either kind of queue; spawning one costs about 0.1 s, "
     "so each test gets its own.")
    w = WorkerUnderTest(queue_kind=request.param)
    try: yield w
    finally: w.close()


def test_init_ready_and_stop(worker):
    ready = worker.init(echo={'prefix': '> '})
    assert ready.data['pid'] == worker.process.pid
    assert ready.data['plugins'] == PLUGIN_NAMES
    assert ready.data['loaded_plugins'] == []  # plugins load when a job or a RELOAD needs them
    stopped = worker.stop()
    assert stopped.type == Resp.STOPPED and stopped.data['pid'] == worker.process.pid
    assert worker.process.exitcode == 0


def test_execute_started_then_result_and_plugin_reuse(worker):
    worker.init(echo={'prefix': '> '})
    started, result = worker.execute('echo', text='hi', extra=1)
    assert isinstance(started, WorkerJobStarted) and started.pid == worker.process.pid
    assert result.status == 'success' and result.error is None
    # every key beside job_id, plugin_name, stream
    assert result.data == {'text': '> hi', 'params': {'extra': 1}}
    assert worker.execute('echo', text='again')[-1].data['text'] == '> again'
    # the second echo job reused the loaded plugin; switching plugins unloads the previous one first
    assert worker.execute('history')[-1].data['events'] == ['load echo', 'unload echo', 'load history']


def test_reload_unload_get_state_answer_their_request(worker):
    worker.init(echo={'prefix': '> '})
    worker.execute('echo', text='hi')
    state = worker.command(Req.GET_STATE)
    assert state.type == Resp.STATE and state.data['pid'] == worker.process.pid
    assert state.data['request_type'] == 'get_state' and state.data['plugins'] == PLUGIN_NAMES
    assert state.data['current_plugin'] == state.data['loaded_plugin'] == 'echo'
    assert state.data['current_config'] == {'prefix': '> '} and state.data['loaded_plugins'] == ['echo']

    reload = worker.command(Req.RELOAD, plugin_name='echo', config={'prefix': '>> '})
    assert reload.type == Resp.RESPONSE and reload.data == {
        'request_type': 'reload', 'status': 'success', 'success': True, 'plugin_name': 'echo'}
    assert worker.execute('echo', text='hi')[-1].data['text'] == '>> hi'
    assert worker.command(Req.GET_STATE).data['current_config'] == {'prefix': '>> '}

    unload = worker.command(Req.UNLOAD, plugin_name='echo')
    assert (unload.type == Resp.RESPONSE and unload.data['status'] == 'success'
            and unload.data['was_loaded'] is True)
    assert 'error' not in unload.data and unload.data['request_type'] == 'unload'
    state = worker.command(Req.GET_STATE).data
    assert (state['current_plugin'] is None and state['current_config'] is None
            and state['loaded_plugins'] == [])
    again = worker.command(Req.UNLOAD, plugin_name='echo')  # not loaded: still a success, and says so
    assert again.data['status'] == 'success' and again.data['success'] and again.data['was_loaded'] is False


def test_reload_goes_through_reload_plugin_one_plugin_at_a_time(worker):
    worker.init(echo={'prefix': '> '})
    worker.execute('history')
    # reloading a plugin that is not loaded: the loaded one is unloaded, then the plugin manager's
    # reload_plugin runs
    assert worker.command(Req.RELOAD, plugin_name='echo', config={'prefix': '# '}).data['status'] == 'success'
    state = worker.command(Req.GET_STATE).data
    assert (state['current_plugin'], state['current_config']) == ('echo', {'prefix': '# '})
    # the echo job reuses the reloaded plugin: no load_plugin call, no second load
    assert worker.execute('echo', text='x')[-1].data['text'] == '# x'
    events = worker.execute('history')[-1].data['events']
    assert events == ['load history', 'unload history', 'reload echo', 'unload echo', 'load history']


def test_failed_reload_answers_error_and_leaves_no_plugin_loaded(worker):
    worker.init(echo={'prefix': '> '})
    worker.execute('echo', text='hi')
    refused = worker.command(Req.RELOAD, plugin_name='echo', config={'fail_load': True})
    assert refused.data['status'] == 'error' and refused.data['success'] is False
    assert refused.data['error'] == 'plugin echo refused its configuration'  # the plugin's own message
    assert refused.data['request_type'] == 'reload' and refused.data['plugin_name'] == 'echo'
    assert worker.command(Req.GET_STATE).data['current_plugin'] is None
    # the next job loads echo afresh, with its last good configuration
    assert worker.execute('echo', text='hi')[-1].data['text'] == '> hi'
    unknown = worker.command(Req.RELOAD, plugin_name='no-such-plugin', config={})
    assert unknown.data['status'] == 'error' and 'no-such-plugin' in unknown.data['error']


def test_reload_with_no_config_unloads(worker):
    worker.init(echo={'prefix': '> '})
    worker.execute('echo', text='hi')
    unloaded = worker.command(Req.RELOAD, plugin_name='echo', config=None)
    assert unloaded.data['status'] == 'success' and unloaded.data['was_loaded'] is True
    assert worker.command(Req.GET_STATE).data['loaded_plugins'] == []
    assert worker.execute('history')[-1].data['events'] == ['load echo', 'unload echo', 'load history']


def test_commands_before_init_answer_error(worker):
    resp = worker.command(Req.RELOAD, plugin_name='echo', config={})
    assert resp.data['status'] == 'error' and 'not initialised' in resp.data['error']
    assert worker.command(Req.GET_STATE).data['current_plugin'] is None


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
    assert result.error == 'boom' and result.error_type == 'RuntimeError'  # job.error is the plugin's message
    assert 'Traceback' in result.traceback and 'RuntimeError: boom' in result.traceback
    assert 'execute_plugin' in result.traceback  # the plugin's own frame, not only the worker's
    assert worker.execute('echo', text='still up')[-1].data['text'] == 'still up'


@pytest.mark.parametrize('plugin,params,error,error_type', [
    ('sysexit', {}, '5', 'SystemExit'),
    ('fail', {'exception': 'KeyboardInterrupt', 'message': 'interrupted'}, 'interrupted',
     'KeyboardInterrupt'),
    ('fail', {'exception': 'GeneratorExit'}, 'failed', 'GeneratorExit'),
    ('badstr', {}, '<unprintable UnprintableError>', 'UnprintableError'),
    ('fail', {'message': ''}, 'RuntimeError', 'RuntimeError'),
], ids=['SystemExit', 'KeyboardInterrupt', 'GeneratorExit', 'unprintable', 'empty-message'])
def test_any_plugin_exception_fails_only_its_job(no_leftover_processes, plugin, params, error, error_type):
    w = WorkerUnderTest(queue_kind='SimpleQueue')
    try:
        w.init()
        result = w.execute(plugin, **params)[-1]
        assert (result.status, result.error, result.error_type) == ('error', error, error_type)
        assert result.traceback and error_type in result.traceback
        assert w.execute('echo', text='still up')[-1].data['text'] == 'still up'
        assert w.stop().type == Resp.STOPPED and w.process.exitcode == 0
    finally: w.close()


def test_execute_is_flat_every_other_key_is_a_plugin_argument(worker):
    worker.init()
    # job_id, plugin_name and stream are the worker's; `params` is just another argument now
    result = worker.execute('echo', text='hi', params={'a': 1}, language='en')[-1]
    assert result.data == {'text': 'hi', 'params': {'params': {'a': 1}, 'language': 'en'}}
    # a request id on an EXECUTE is not passed on either
    worker.send(Req.EXECUTE, 'rid-1', job_id='j-rid', plugin_name='echo', text='x')
    msgs = [worker.result(), worker.result()]
    assert msgs[-1].job_id == 'j-rid' and msgs[-1].data == {'text': 'x', 'params': {}}


def test_wire_dicts_have_the_documented_keys(worker):
    worker.init()
    started, ok = worker.execute_raw('echo', text='hi')
    job = {'type': 'result', 'job_id': ok['job_id'], 'status': 'success'}
    # no None-valued error, traceback or error_type
    assert ok == {**job, 'data': {'text': 'hi', 'params': {}}}
    failed = worker.execute_raw('fail', message='boom')[-1]
    assert set(failed) == {'type', 'job_id', 'status', 'error', 'error_type', 'traceback'}
    assert (failed['error'], failed['error_type']) == ('boom', 'RuntimeError')
    _, *chunks, result = worker.execute_raw('stream', stream=True, text='a b')
    chunk = {'type': 'stream_chunk', 'job_id': result['job_id'], 'metadata': {}}
    assert chunks == [{**chunk, 'chunk': 'a ', 'is_final': False}, {**chunk, 'chunk': 'b', 'is_final': False},
                      {**chunk, 'chunk': '', 'is_final': True}]
    assert result == {**job, 'job_id': result['job_id'], 'data': {'streamed': True}}


def test_unknown_plugin_and_execute_before_init_are_job_errors(worker):
    before = worker.execute('echo', text='too early')[-1]
    assert before.status == 'error' and 'not initialised' in before.error
    worker.init()
    unknown = worker.execute('no-such-plugin')[-1]
    assert (unknown.status == 'error' and unknown.error_type == 'ValueError'
            and 'no-such-plugin' in unknown.error)
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
    assert result.status == 'success' and result.data == {'streamed': True}  # the text went out in the chunks
    # without stream=True the same plugin answers with one result and no chunks
    assert [type(m) for m in worker.execute('stream', text='a b')] == [WorkerJobStarted, WorkerResult]


def test_streaming_needs_the_worker_the_request_and_the_plugin(no_leftover_processes):
    # a plugin that can stream, asked to, on a worker started without streaming support: execute_plugin runs
    target = functools.partial(base_worker_process, plugin_manager_factory=ScenarioPluginManager,
                               supports_streaming=False)
    w = WorkerUnderTest(target=target, queue_kind='SimpleQueue')
    try:
        w.init()
        started, result = w.execute('stream', stream=True, text='a b')
        assert isinstance(result, WorkerResult) and result.data == {'text': 'a b'}
        assert w.stop().type == Resp.STOPPED
    finally: w.close()


def test_stream_request_on_a_plugin_that_cannot_stream_runs_execute_plugin(worker):
    worker.init(echo={'prefix': '> '})
    started, result = worker.execute('echo', stream=True, text='hi')
    assert result.status == 'success' and result.data == {'text': '> hi', 'params': {}}


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
        w.send(Req.EXECUTE, job_id=job_id, plugin_name=plugin, **params)
        started = w.result()
        assert isinstance(started, WorkerJobStarted) and started.job_id == job_id
        w.process.join(TIMEOUT)
        assert w.process.exitcode == exitcode
        # no result and no STOPPED: a death, not an exit
        with pytest.raises(queue.Empty): w.result(timeout=0.2)
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
        # the INIT exception ends the process, as any uncaught exception in it would
        assert w.process.exitcode == 1
    finally: w.close()


# ----- cancel that keeps the model (issue 22, the worker's side) --------------------------------------------
def _until(w:WorkerUnderTest, kind:str) -> list:
    "Raw result messages up to the first of type `kind`."
    got = [w.raw_result()]
    while got[-1]['type'] != kind: got.append(w.raw_result())
    return got

def _start(w:WorkerUnderTest, plugin_name:str, job_id:str, first:str, stream:bool=False, **params) -> list:
    "Send a job; wait for its first message of type `first` after it started."
    w.send(Req.EXECUTE, job_id=job_id, plugin_name=plugin_name, stream=stream, **params)
    return _until(w, first)

def _history(w:WorkerUnderTest) -> list: return w.execute('history')[-1].data['events']

@pytest.mark.parametrize('plugin, params, first, how', [
    ('stream', {'stream': True, 'text': ' '.join(['w'] * 200), 'delay': 0.02}, 'stream_chunk',
     'stream closed'),
    ('progress', {'seconds': 10, 'steps': 500}, 'progress', None),
    ('cancellable', {'seconds': 10, 'steps': 500}, 'job_started', 'cancellable stopped')],
    ids=['stream', 'report_progress', 'check_cancelled'])
def test_running_job_stops_at_its_cancel_and_the_plugin_stays_loaded(worker, plugin, params, first, how):
    worker.init()
    t0 = time.monotonic()
    before = _start(worker, plugin, 'j1', first, **params)
    worker.send(Req.CANCEL, job_id='j1')
    after = _until(worker, 'job_cancelled')
    assert time.monotonic() - t0 < 5, "the job ran on after its cancel"
    assert after[-1] == {'type': 'job_cancelled', 'job_id': 'j1'}
    kinds = {m['type'] for m in before + after[:-1]}
    assert 'result' not in kinds and kinds <= {'job_started', 'stream_chunk', 'progress'}, kinds
    # the next job of the same plugin runs in the same process, the plugin not loaded again
    again = worker.execute(plugin, **{**params, 'text': 'a b', 'delay': 0, 'seconds': 0, 'steps': 1})
    assert isinstance(again[-1], WorkerResult) and again[-1].status == 'success', again[-1]
    assert again[0].pid == worker.process.pid
    events = _history(worker)
    assert events.count(f'load {plugin}') == 1, events
    if how: assert how in events, events
    worker.stop()

def test_cancel_of_another_job_is_never_acted_on(worker):
    worker.init()
    _start(worker, 'cancellable', 'run', 'job_started', seconds=0.5, steps=50)
    # handed behind it, then cancelled
    worker.send(Req.EXECUTE, job_id='next', plugin_name='echo', text='never')
    worker.send(Req.CANCEL, job_id='next')
    worker.send(Req.CANCEL, job_id='gone')  # a job that is not here at all
    done = _until(worker, 'result')
    assert done[-1]['job_id'] == 'run' and done[-1]['status'] == 'success', done[-1]
    assert 'job_cancelled' not in {m['type'] for m in done}
    later = worker.execute('echo', text='after')  # 'next' was dropped unrun: the next message is this job's
    assert later[-1].data['text'] == 'after'
    assert 'cancellable stopped' not in _history(worker)
    worker.stop()

def test_cancel_outside_a_checkpoint_lets_the_job_finish(worker):
    "A plugin that never reports progress nor checks: the cancel waits; the job ends with its result."
    worker.init()
    _start(worker, 'sleep', 'quiet', 'job_started', seconds=0.3)
    worker.send(Req.CANCEL, job_id='quiet')
    done = _until(worker, 'result')
    assert done[-1]['job_id'] == 'quiet' and done[-1]['status'] == 'success'
    assert worker.execute('echo', text='next')[-1].status == 'success'  # the stale CANCEL is dropped
    worker.stop()
