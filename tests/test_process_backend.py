"The local process backend in real processes: the pipes, their framing, deaths, process trees, PDEATHSIG."
import functools, gc, json, logging, os, select, signal, subprocess, sys, textwrap, threading, time

import psutil
import pytest

from conftest import pid_gone, seconds_until_gone
from cjm_fasthtml_workers.backends.process import (
    CorruptStream, ProcessWorker, Unreadable, describe_exit, kill_token)
from cjm_fasthtml_workers.backends.transport import readable
from cjm_fasthtml_workers.core.wire import frame_header
from cjm_fasthtml_workers.core.protocol import WorkerRequest
from cjm_fasthtml_workers.core.protocol import WorkerRequestType as Req, WorkerResponseType as Resp
from cjm_fasthtml_workers.core.worker import TOKEN_ENV, WATCHDOG_ENV
from cjm_fasthtml_workers.testing import closing_worker_process, raw_writer_process, scenario_worker_process
from multiprocessing.reduction import ForkingPickler

pytestmark = pytest.mark.timeout(60)
log = logging.getLogger(__name__)
TIMEOUT = 10.0  # seconds any one exchange may take; a broken worker fails the test instead of hanging it
NO_WATCHDOG = {WATCHDOG_ENV: '0'}  # for tests of what the app itself ends, without the worker's watchdog


# ----- helpers ----------------------------------------------------------------------------------------------
@pytest.fixture
def make_worker(no_leftover_processes):
    "Start ProcessWorkers; each is stopped and closed at teardown, and no child process may be left."
    made = []
    def make(entry_point=scenario_worker_process, env=None, name='test-worker') -> ProcessWorker:
        w = ProcessWorker(entry_point, name, env)
        made.append(w)
        w.start()
        return w
    yield make
    for w in made:
        try: w.stop(graceful=False, timeout=0)
        finally: w.close()


def pump(w:ProcessWorker, until, timeout:float=TIMEOUT) -> list:
    ("Poll the worker's pipes as a supervisor does, flushing and reading, until `until(messages)`; "
     "all messages.")
    msgs, deadline = [], time.monotonic() + timeout
    while not until(msgs):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; read so far: {[m['type'] for m in msgs]}"
        poller = select.poll()
        for fd in w.fds():
            if fd != w.death_fd: poller.register(fd, select.POLLIN)
        if w.wants_write(): poller.register(w.write_fd, select.POLLOUT)
        poller.poll(min(left, 0.1) * 1000)
        w.flush()
        msgs += w.read()
        while w.buffered(): msgs += w.read()
    return msgs


def result_of(job_id:str):
    return lambda msgs: any(m['type'] == Resp.RESULT.value and m.get('job_id') == job_id for m in msgs)


def init(w:ProcessWorker) -> dict:
    w.send(WorkerRequest(Req.INIT, {'plugin_configs': {}}).to_dict())
    msgs = pump(w, lambda msgs: any(m['type'] == Resp.READY.value for m in msgs))
    return msgs[-1]


def execute_request(job_id:str, plugin:str, **params) -> dict:
    "The flat EXECUTE a manager sends."
    return WorkerRequest(Req.EXECUTE, {'job_id': job_id, 'plugin_name': plugin, **params}).to_dict()


def execute(w:ProcessWorker, job_id:str, plugin:str, **params) -> dict:
    "Run one job; its RESULT message."
    w.send(execute_request(job_id, plugin, **params))
    return pump(w, result_of(job_id))[-1]




def end(*pids:int):
    "Kill processes a failed test may leave outside this process's tree."
    for pid in pids:
        try: psutil.Process(pid).kill()
        except psutil.Error: pass


def watchdog_of(w:ProcessWorker) -> list:
    return [p.pid for p in psutil.Process(w.pid).children() if 'cjm-worker-watchdog' in p.cmdline()]


# ----- the happy path ---------------------------------------------------------------------------------------
def test_round_trip_then_graceful_stop(make_worker):
    w = make_worker()
    ready = init(w)  # READY comes on the result pipe
    assert ready['pid'] == w.pid and 'echo' in ready['plugins']
    w.send(execute_request('j1', 'echo', text='hi'))
    started, result = pump(w, result_of('j1'))[-2:]
    assert (started['type'], started['job_id']) == ('job_started', 'j1')
    assert result['status'] == 'success' and result['data']['text'] == 'hi'
    w.send(WorkerRequest(Req.GET_STATE, request_id='r1').to_dict())  # answered on the response pipe
    state = pump(w, lambda msgs: any(m['type'] == Resp.STATE.value for m in msgs))[-1]
    assert state['request_id'] == 'r1' and state['pid'] == w.pid
    assert w.stop(graceful=True, timeout=TIMEOUT) == 0
    assert [m['type'] for m in w.read()] == [Resp.STOPPED.value]
    assert w.at_eof() and w.fds() == [] and not w.alive()
    assert describe_exit(w.exitcode) == 'worker exited with code 0'


def test_env_is_in_the_child_before_its_code_runs_and_the_app_env_is_restored(make_worker, monkeypatch):
    monkeypatch.setenv('CUDA_DEVICE_ORDER', 'FASTEST_FIRST')
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    env = {'CUDA_VISIBLE_DEVICES': 'GPU-0123', 'CUDA_DEVICE_ORDER': 'PCI_BUS_ID'}
    w = make_worker(env=env)
    # the app's environment is as it was, and no worker token leaked into it
    assert os.environ['CUDA_DEVICE_ORDER'] == 'FASTEST_FIRST' and 'CUDA_VISIBLE_DEVICES' not in os.environ
    assert TOKEN_ENV not in os.environ
    init(w)
    keys = ['CUDA_VISIBLE_DEVICES', 'CUDA_DEVICE_ORDER', TOKEN_ENV]
    data = execute(w, 'e', 'env', keys=keys)['data']
    assert data['env'] == {**env, TOKEN_ENV: w.token}
    assert data['at_import'] == data['env']  # already there when the worker imported its entry point's module


def test_concurrent_starts_each_get_their_own_env_and_survive_their_starting_thread(make_worker):
    # PDEATHSIG fires as the thread that forked a worker ends: every start runs on the spawner thread instead
    workers = {}
    def start(i): workers[i] = make_worker(env={'CJM_WHO': str(i)})
    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    time.sleep(0.2)
    for i, w in workers.items():
        assert w.alive()
        init(w)
        assert execute(w, 'e', 'env', keys=['CJM_WHO', TOKEN_ENV])['data']['env'] == {'CJM_WHO': str(i),
                                                                                    TOKEN_ENV: w.token}
    assert len({w.token for w in workers.values()}) == 4


def test_read_limit_and_buffered(make_worker):
    w = make_worker()
    init(w)
    for i in range(100): w.send(execute_request(f'e{i}', 'echo', text=str(i)))
    w.send(WorkerRequest(Req.STOP).to_dict())
    assert readable(w.death_fd, TIMEOUT)  # it wrote everything (about 30 KB: it fits in the pipe) and exited
    got = w.read(limit=5)
    assert len(got) == 5 and w.buffered()
    while w.buffered(): got += w.read(limit=5)  # no poll needed while buffered() says so
    results = [m['data']['text'] for m in got if m['type'] == 'result']
    assert results == [str(i) for i in range(100)] and got[-1]['type'] == Resp.STOPPED.value
    assert w.read() == [] and w.at_eof()


# ----- sending ----------------------------------------------------------------------------------------------
def test_send_never_blocks_on_a_worker_that_does_not_read(make_worker):
    w = make_worker()
    init(w)
    text = 'x' * (50 << 20)
    os.kill(w.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        w.send(execute_request('big', 'echo', text=text))
        took = time.monotonic() - t0
        w.flush()
        assert w.wants_write(), "50 MB cannot have gone into a pipe that nobody reads"
    finally: os.kill(w.pid, signal.SIGCONT)
    log.info("send of 50 MB to a stopped worker returned in %.1f ms", took * 1000)
    assert took < 1.0
    t0 = time.monotonic()
    result = pump(w, result_of('big'), timeout=30)[-1]
    log.info("after SIGCONT: 50 MB there and back in %.0f ms", (time.monotonic() - t0) * 1000)
    assert not w.wants_write() and len(result['data']['text']) == len(text) and result['data']['text'] == text


def test_unpicklable_request_raises_in_send_and_nothing_is_sent(make_worker):
    w = make_worker()
    init(w)
    with pytest.raises(TypeError, match='pickle'): w.send(execute_request('x', 'echo', lock=threading.Lock()))
    assert not w.wants_write()
    assert execute(w, 'ok', 'echo', text='still fine')['data']['text'] == 'still fine'


def test_send_to_a_dead_or_closed_worker_is_dropped_silently(make_worker):
    w = make_worker()
    w.kill()
    assert w.reap() == -signal.SIGKILL
    w.send(execute_request('x', 'echo'))  # no reader left: dropped
    assert not w.wants_write()
    w.close()
    w.send(execute_request('y', 'echo'))
    w.flush()
    assert not w.wants_write() and w.fds() == []


# ----- reading what the worker wrote ------------------------------------------------------------------------
def _framed(obj) -> bytes:
    payload = ForkingPickler.dumps(obj).tobytes()
    return frame_header(len(payload)) + payload

@pytest.mark.parametrize('raw, error, before', [
    (b'garbage on the result pipe', 'holds no pickle', []),
    (_framed([1, 2]), 'not a message dict: list', []),
    (_framed({'type': 'ready'}) + b'\x00\x00\x00\x01x', 'bad frame length 1', [{'type': 'ready'}])])
def test_garbage_on_the_result_pipe_raises_corrupt_stream(make_worker, raw, error, before):
    w = make_worker(functools.partial(raw_writer_process, raw=raw))
    result_fd = w.fds()[0]
    with pytest.raises(CorruptStream, match=error) as e: pump(w, lambda msgs: False, timeout=5)
    assert e.value.messages == before  # what was good before the garbage is not lost
    assert result_fd not in w.fds()  # never polled again: it would spin on bytes nobody reads
    with pytest.raises(CorruptStream): w.read()


def test_unreadable_objects_are_replaced_and_later_messages_still_read(make_worker):
    w = make_worker()
    init(w)
    alien = execute(w, 'a', 'alien')  # its class exists only in the worker
    assert isinstance(alien['data']['alien'], Unreadable) and alien['data']['note'] == 'the rest is readable'
    assert alien['_unreadable'].startswith('cjm_worker_only.Alien could not be imported (ModuleNotFoundError')
    bad = execute(w, 'b', 'badreduce')  # its reconstruction raises
    assert isinstance(bad['data']['error'], Unreadable) and bad['data']['note'] == 'the rest is readable'
    assert 'TwoArgError could not be rebuilt (TypeError' in bad['_unreadable']
    after = execute(w, 'c', 'echo', text='after')
    assert after['data']['text'] == 'after' and '_unreadable' not in after


def test_eof_is_reported_once_and_read_does_not_spin(make_worker):
    w = make_worker(closing_worker_process)  # closes its result and response pipes, and keeps running
    pump(w, lambda msgs: w.at_eof())
    assert w.alive() and w.fds() == [w.death_fd]  # the pipes at end of file are no longer polled
    t0 = time.monotonic()
    for _ in range(1000): assert w.read() == []
    assert time.monotonic() - t0 < 0.5 and w.at_eof()
    poller = select.poll()
    for fd in w.fds():
        if fd != w.death_fd: poller.register(fd, select.POLLIN)
    t0 = time.monotonic()
    assert poller.poll(200) == [] and time.monotonic() - t0 >= 0.15  # the poll waits: nothing makes it spin
    assert w.stop(graceful=False, timeout=0) == -signal.SIGTERM


# ----- death ------------------------------------------------------------------------------------------------
def test_death_fd_fires_at_once_even_when_a_grandchild_holds_all_the_pipes(make_worker):
    w = make_worker(env=NO_WATCHDOG)  # the watchdog would end the grandchild, and so close the pipes, at once
    init(w)
    child = execute(w, 'f', 'fork')['data']['pid']
    try:
        assert psutil.Process(child).ppid() == w.pid
        result_fd = w.fds()[0]
        os.kill(w.pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert readable(w.death_fd, 1.0)  # (its time is logged; the benchmarks time deaths)
        took = time.monotonic() - t0
        log.info("death fd fired %.2f ms after SIGKILL, a grandchild holding the pipes", took * 1000)
        # what a worker's death used to be seen by: still open, held by the grandchild
        assert not readable(result_fd, 0.1) and not readable(w.process.sentinel, 0)
        assert not w.alive() and w.reap() == -signal.SIGKILL
        assert pid_gone(child, 2)
    finally: end(child)


def test_death_is_seen_on_the_sentinel_where_there_are_no_pidfds(make_worker, monkeypatch):
    monkeypatch.delattr(os, 'pidfd_open')
    w = make_worker()
    assert w.death_fd == w.process.sentinel
    init(w)
    w.send(execute_request('k', 'kill'))
    assert readable(w.death_fd, TIMEOUT) and not w.alive()
    assert w.reap() == -signal.SIGKILL and w.fds()[-1:] != [w.process.sentinel]


def test_stop_escalates_to_sigterm_for_a_busy_worker(make_worker):
    w = make_worker()
    init(w)
    w.send(execute_request('h', 'hang'))
    pump(w, lambda msgs: any(m['type'] == 'job_started' for m in msgs))
    t0 = time.monotonic()
    assert w.stop(graceful=True, timeout=0.3) == -signal.SIGTERM
    assert time.monotonic() - t0 < 2.0


def test_start_failure_leaves_no_fd_and_no_process(no_leftover_processes):
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    gc.collect()  # earlier tests' finalizers close their fds now, not during the comparison
    before = set(os.listdir('/proc/self/fd'))
    w = ProcessWorker(lambda *queues: None, 'unpicklable-entry-point')
    with pytest.raises(Exception, match='pickle|lambda'): w.start()
    # no fd of its own is left (an fd that something else closed meanwhile is no leak)
    assert set(os.listdir('/proc/self/fd')) - before == set() and w.pid is None and w.fds() == []


# ----- the worker's process tree ----------------------------------------------------------------------------
def test_kill_ends_a_setsid_grandchild_and_a_double_forked_daemon(make_worker):
    w = make_worker(env=NO_WATCHDOG)
    init(w)
    in_session = execute(w, 's', 'daemon', how='setsid')['data']['pid']
    daemon = execute(w, 'd', 'daemon', how='double_fork')['data']['pid']
    try:
        assert os.getpgid(in_session) != w.pid and os.getpgid(daemon) != w.pid  # both left the worker's group
        # the worker is a subreaper: its daemon is still its child
        assert psutil.Process(daemon).ppid() == w.pid
        t0 = time.monotonic()
        w.kill()
        log.info("kill() of the tree took %.1f ms", (time.monotonic() - t0) * 1000)
        assert pid_gone(in_session, 2) and pid_gone(daemon, 2)
        assert w.reap() == -signal.SIGKILL
    finally: end(in_session, daemon)


def test_reap_after_a_crash_ends_a_daemon_that_went_to_init(make_worker):
    w = make_worker(env=NO_WATCHDOG)
    init(w)
    daemon = execute(w, 'd', 'daemon')['data']['pid']
    try:
        w.send(execute_request('k', 'kill'))
        assert readable(w.death_fd, TIMEOUT)
        # orphaned: nobody's descendant here, in no group of the worker's; only its token names it
        assert psutil.Process(daemon).is_running() and psutil.Process(daemon).ppid() != w.pid
        assert daemon not in [p.pid for p in psutil.Process().children(recursive=True)]
        t0 = time.monotonic()
        assert w.reap() == -signal.SIGKILL
        log.info("reap() with its token scan took %.1f ms", (time.monotonic() - t0) * 1000)
        assert pid_gone(daemon, 2)
    finally: end(daemon)


def test_the_watchdog_ends_the_daemon_when_the_worker_dies(make_worker):
    w = make_worker()
    init(w)
    daemon = execute(w, 'd', 'daemon')['data']['pid']
    try:
        watchdog, = watchdog_of(w)
        os.kill(w.pid, signal.SIGKILL)  # no kill(), no reap(): the watchdog alone
        took = seconds_until_gone(daemon, 5)
        log.info("the watchdog ended the daemon %.0f ms after the worker's SIGKILL", took * 1000)
        assert took < 1.0 and pid_gone(watchdog, 2)
        assert w.reap() == -signal.SIGKILL
    finally: end(daemon)


def test_the_watchdog_ignores_sigterm_while_the_worker_lives(make_worker):
    w = make_worker()
    init(w)
    watchdog, = watchdog_of(w)
    os.kill(watchdog, signal.SIGTERM)  # as a plugin's killpg(0, SIGTERM) would
    time.sleep(0.2)
    assert psutil.Process(watchdog).status() != psutil.STATUS_ZOMBIE
    assert w.stop(graceful=True, timeout=TIMEOUT) == 0 and pid_gone(watchdog, 2)


def test_the_token_scan_spares_the_apps_own_session(no_leftover_processes):
    # a child of the app that started in the instant a worker's environment was set carries the worker's token
    token = ProcessWorker(scenario_worker_process, 'unused').token
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],
                             env={**os.environ, TOKEN_ENV: token})
    try: assert kill_token(token) == [] and child.poll() is None
    finally: child.kill(); child.wait()


# ----- the app dies -----------------------------------------------------------------------------------------
APP = textwrap.dedent('''
    import json, select, time
    from cjm_fasthtml_workers.backends.process import ProcessWorker
    from cjm_fasthtml_workers.core.protocol import WorkerRequest, WorkerRequestType as Req
    from cjm_fasthtml_workers.testing import scenario_worker_process
    w = ProcessWorker(scenario_worker_process, 'pdeathsig-app-worker')
    w.start()
    def until(kind, job_id=None):
        while True:
            select.select([w.fds()[0]], [], [], 1.0)
            for m in w.read():
                if m['type'] == kind and m.get('job_id') == job_id: return m
    w.send(WorkerRequest(Req.INIT, {'plugin_configs': {}}).to_dict())
    until('ready')
    w.send(WorkerRequest(Req.EXECUTE, {'job_id': 'd', 'plugin_name': 'daemon'}).to_dict())
    daemon = until('result', 'd')['data']['pid']
    w.send(WorkerRequest(Req.EXECUTE, {'job_id': 'g', 'plugin_name': 'gil'}).to_dict())
    until('job_started', 'g')
    print(json.dumps({'worker': w.pid, 'daemon': daemon}), flush=True)
    time.sleep(600)
''')

def test_a_killed_app_takes_its_worker_along_even_inside_a_gil_holding_call(no_leftover_processes):
    app = subprocess.Popen([sys.executable, '-c', APP], stdout=subprocess.PIPE, text=True)
    pids = {}
    try:
        pids = json.loads(app.stdout.readline())
        time.sleep(0.3)  # the worker's main thread is inside sum(range(10**12)) now, holding the GIL
        worker = psutil.Process(pids['worker'])
        assert worker.status() == psutil.STATUS_RUNNING and worker.cpu_percent(0.2) > 10  # busy, not asleep
        app.kill()
        t0 = time.monotonic()
        took = seconds_until_gone(pids['worker'], 5)
        seconds_until_gone(pids['daemon'], 5)
        daemon_took = time.monotonic() - t0
        log.info("app SIGKILLed: worker gone after %.1f ms (PDEATHSIG), its daemon after %.1f ms (watchdog)",
                 took * 1000, daemon_took * 1000)
        assert took <= 1.0 and daemon_took <= 1.0
    finally:
        app.kill(); app.wait(); app.stdout.close()
        end(*pids.values())
