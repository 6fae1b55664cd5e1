"""What the tests share: a job manager on the scenario plugins (`TextJobManager`), the one `make` of
a manager, `run`, `until(what, pred)`, `finish`, `assert_terminal`, the event `Recorder`, a recording
resource manager, and `Lines`, which reads a child process's output line by line with a timeout.

Test modules import from here (and from conftest), never from one another. This module is plain Python (no
pytest): spawned workers and the apps some tests run in a process of their own import it by name (tests/ is on
their sys.path), so worker entry points and plugin managers that several tests use live here too."""
import asyncio, os, re, select, threading, time, uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
from cjm_fasthtml_workers.core.worker import base_worker_process
from cjm_fasthtml_workers.managers.base import BaseJob, BaseJobManager, TERMINAL_STATUSES
from cjm_fasthtml_workers.testing import ScenarioPluginManager, scenario_worker_process

RUN_TIMEOUT = 50  # seconds `run` gives a test's main coroutine unless it says more (under pytest's timeouts)

# ----- a job manager on the scenario plugins ----------------------------------------------------------------
@dataclass
class TextJob(BaseJob):
    params: Dict[str, Any] = field(default_factory=dict)

class TextJobManager(BaseJobManager[TextJob]):
    "Jobs are a plugin name and its keyword arguments; workers run `testing.scenario_worker_process`."
    def create_job(self, plugin_id, **kwargs):
        return TextJob(id=uuid.uuid4().hex, plugin_id=plugin_id, params=kwargs)
    def get_worker_entry_point(self): return scenario_worker_process
    def prepare_execute_request(self, job): return job.params
    def extract_job_result(self, job, result_data): return result_data

# ----- what a manager is given: an event broadcaster, a resource manager ---------------------------------
class Recorder:
    "Event broadcaster that records events and the thread they arrive on."
    def __init__(self): self.events, self.threads = [], set()
    async def broadcast(self, event_type, data):
        self.events.append((event_type, data))
        self.threads.add(threading.get_ident())
    def of(self, job_id): return [e.split(':', 1)[1] for e, d in self.events if d.get('job_id') == job_id]
    def kinds(self): return [e.split(':', 1)[1] for e, d in self.events]

class RecordingResourceManager:
    "A resource manager that records each call as (`register`|`unregister`|`update`, pid, ...)."
    def __init__(self): self.calls = []
    def register_worker(self, pid, worker_type): self.calls.append(('register', pid, worker_type))
    def unregister_worker(self, pid): self.calls.append(('unregister', pid))
    def update_worker_state(self, pid, **kw): self.calls.append(('update', pid, kw))

def of_kind(events:Recorder, kind:str) -> list:
    "The data of each `text:{kind}` event `events` recorded."
    return [d for e, d in events.events if e == f'text:{kind}']

# ----- making and driving a manager -------------------------------------------------------------------------
def make(n:int=1, # worker processes (`max_workers`)
         policy:RestartPolicy=RestartPolicy.ON_CANCELLATION, # the restart policy
         cls:type=TextJobManager, # the manager class
         events=Recorder, # the event broadcaster; a class is called for a new one; None for none
         resource_manager=None, # given to the manager as it is
         worker_type:str='text', # the manager's worker type (events are named `{worker_type}:{kind}`)
         streaming:bool=True, # `supports_streaming`
         **cfg): # the rest of the WorkerConfig
    "A manager of `cls` and its event broadcaster: `(manager, events)`."
    events = events() if isinstance(events, type) else events
    m = cls(worker_type, 'test', supports_streaming=streaming, event_broadcaster=events,
            resource_manager=resource_manager,
            worker_config=WorkerConfig(max_workers=n, restart_policy=policy, **cfg))
    return m, events

def run(coro, timeout:float=RUN_TIMEOUT):
    "Run a test's main coroutine on a new event loop; fail it after `timeout` seconds."
    return asyncio.run(asyncio.wait_for(coro, timeout))

async def until(what:str, pred, timeout:float=20.0):
    "Poll `pred()` on the loop until it is true; fail saying `what` was not reached within `timeout` s."
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"not reached within {timeout} s: {what}"
        await asyncio.sleep(0.005)

async def finish(m, job, timeout:float=30):
    "Wait for `job` to end and return it; one that does not end in `timeout` s raises TimeoutError naming it."
    try: return await m.wait_for_job(job.id, timeout=timeout)
    except TimeoutError:
        raise TimeoutError(f"job {job.id} ({job.plugin_id}) still {job.status!r} after {timeout} s") from None

def assert_terminal(m):
    "Every job of `m` has ended, and each completed one has a result."
    for j in m.get_all_jobs():
        assert j.status in TERMINAL_STATUSES and j.completed_at, (j.id, j.status)
        if j.status == 'completed': assert j.result is not None

# ----- a plugin that says each time it runs (the store tests; their app imports it by name) ----------------
RUN_LOG = 'CJM_STORE_RUN_LOG'  # environment: the file a worker appends `<app run> <job id>` to as a job runs
APP_RUN = 'CJM_STORE_APP_RUN'  # environment: which run of the app this is (spawned workers inherit it)

def append_line(path, line:str):
    "One write on an O_APPEND descriptor: the line is in the file once this returns, even after kill -9."
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try: os.write(fd, (line + '\n').encode())
    finally: os.close(fd)

class RunLogPluginManager(ScenarioPluginManager):
    "The scenario plugins; a job that names its `run_id` is logged to $CJM_STORE_RUN_LOG as it starts to run."
    def execute_plugin(self, plugin_name, run_id=None, **params):
        if run_id is not None and os.environ.get(RUN_LOG):
            append_line(os.environ[RUN_LOG], f"{os.environ.get(APP_RUN, '-')} {run_id}")
        return super().execute_plugin(plugin_name, **params)

def runlog_worker_process(request_queue, result_queue, response_queue):
    "Worker entry point running `RunLogPluginManager` plugins."
    base_worker_process(request_queue, result_queue, response_queue, RunLogPluginManager,
                        supports_streaming=True)

class RunLogManager(TextJobManager):
    "TextJobManager whose jobs are logged each time they run (the job id goes to the worker as `run_id`)."
    def get_worker_entry_point(self): return runlog_worker_process
    def prepare_execute_request(self, job): return {**job.params, 'run_id': job.id}

# ----- the README's FastHTML app (tests run it under real servers) ------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
README_HEADING = '## Use it in a FastHTML app'

def readme_app() -> str:
    "The app of README.md's FastHTML section (CJM_README names another markdown file to take it from)."
    text = Path(os.environ.get('CJM_README', ROOT/'README.md')).read_text()
    where = os.environ.get('CJM_README', 'README.md')
    assert README_HEADING in text, f"no '{README_HEADING}' section in {where}"
    section = text.split(README_HEADING, 1)[1].split('\n## ', 1)[0]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)

# ----- a child process's output, line by line, with a timeout -----------------------------------------------
class Lines:
    """The lines a child process writes to a pipe, each waited for at most `timeout` seconds.

    It reads the pipe's file descriptor itself. `select()` on a pipe, then `readline()` on the buffered file
    that wraps it, loses lines: when two lines arrive in one read, `readline()` keeps the second in the file's
    buffer, and the next `select()` waits on the empty pipe until the child writes again or exits. The README
    store quickstart's test waited 30 s that way (its 'completed' and 'stop this app now' came together)."""
    def __init__(self, stream): # the child's stdout (text or binary): read through its fd only from now on
        self.fd, self.buf, self.eof = stream.fileno(), b'', False

    def next(self, timeout:float) -> str: # the next line with its newline; '' at end of file
        "The next line; `TimeoutError` if none is complete within `timeout` seconds."
        deadline = time.monotonic() + timeout
        while b'\n' not in self.buf and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError(f"no line within {timeout} s; read so far: {self.buf[-500:]!r}")
            data = os.read(self.fd, 65536)
            if data: self.buf += data
            else: self.eof = True
        line, sep, self.buf = self.buf.partition(b'\n')
        return (line + sep).decode(errors='replace')
