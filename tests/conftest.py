"""Shared fixtures: every process test ends by asserting that no child process is left; managers shut down at
teardown; the backends a test runs on. What tests share besides fixtures is in helpers.py."""
import os, signal, socket, subprocess, time, uuid
from pathlib import Path
import psutil, pytest

from cjm_fasthtml_workers.core.worker import TOKEN_ENV
from helpers import make

def _is_resource_tracker(p: psutil.Process) -> bool:
    "multiprocessing's resource tracker lives as long as the test session; it is not a leak."
    try: return any('resource_tracker' in part for part in p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess): return False

def _is_ray_own(p: psutil.Process) -> bool:
    ("A process of the module's Ray instance (its daemons, idle workers, actors): "
     "not ours, which carry a worker token.")
    try: cmd, env = p.cmdline(), p.environ()
    except psutil.Error: return False
    return (TOKEN_ENV not in env and bool(cmd)
            and (cmd[0].startswith('ray::') or any('/ray/' in c for c in cmd[:3])))

def live_children() -> list:
    ("This process's descendants that still run, the resource tracker and a Ray instance's own processes "
     "excepted.")
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and not _is_resource_tracker(p) and not _is_ray_own(p):
                out.append(p)
        except psutil.NoSuchProcess: pass
    return out

def wait_no_children(timeout: float = 10.0) -> list:
    "Wait until no child is left; return those still alive at the deadline."
    deadline = time.monotonic() + timeout
    while (kids := live_children()) and time.monotonic() < deadline: time.sleep(0.05)
    return kids

def seconds_until_gone(pid: int, timeout: float = 5.0) -> float:
    "Seconds until process `pid` has ended (or is a zombie), polled every 2 ms; `timeout` if it has not."
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE: break
        except psutil.NoSuchProcess: break
        time.sleep(0.002)
    return time.monotonic() - t0

def pid_gone(pid: int, timeout: float = 10.0) -> bool:
    "Whether process `pid` (a child or not) has ended within `timeout` seconds."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE: return True
        except psutil.NoSuchProcess: return True
        time.sleep(0.05)
    return False

@pytest.fixture
def no_leftover_processes():
    "Use in every test that starts processes: fails the test if any child outlives it."
    yield
    left = wait_no_children()
    for p in left:
        try: p.kill()
        except psutil.NoSuchProcess: pass
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"

@pytest.fixture
def manager_factory(request, no_leftover_processes):
    """`helpers.make` (same arguments, same `(manager, events)`), and every manager it made is shut down at
    teardown, before `no_leftover_processes` (and the `backend`'s check on Ray) look for what is left."""
    if 'backend' in request.fixturenames: request.getfixturevalue('backend')  # set up first: torn down last
    made = []
    def factory(*args, **kwargs):
        m, events = make(*args, **kwargs)
        made.append(m)
        return m, events
    yield factory
    for m in reversed(made): m.shutdown()

def kill_tree(proc: subprocess.Popen):
    ("After a failure: kill an app and what it started (under --reload, "
     "the server is a child that would outlive it).")
    if proc.poll() is not None: return
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        try: p.kill()
        except psutil.Error: pass
    proc.wait()

def start_web_app(cmd: list, cwd: Path, port: int, env: dict, timeout: float = 30.0) -> subprocess.Popen:
    "Run a web app (its output in `cwd/app.log`) and return once its page answers on 127.0.0.1:`port`."
    import httpx
    with open(cwd/'app.log', 'a') as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (f"{cmd[1:2]} exited with {proc.returncode}:\n"
                                     f"{(cwd/'app.log').read_text()}")
        try:
            if httpx.get(f'http://127.0.0.1:{port}/', timeout=2).status_code == 200: return proc
        except httpx.HTTPError: pass
        time.sleep(0.1)
    kill_tree(proc)
    raise AssertionError(f"the app did not answer within {timeout} s:\n{(cwd/'app.log').read_text()}")

def stop(proc, timeout:float=8.0) -> float:
    "Ctrl+C the app; the seconds it took to exit (it must, by itself)."
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try: proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"the app still ran {timeout} s after Ctrl+C")
    return time.monotonic() - t0

def free_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on now."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

# ----- the backends: local processes, and a local Ray instance (one per test module) ------------------------
RAY_MARK_ENV = 'CJM_TEST_RAY_INSTANCE'  # in the environment of every process of the module's Ray instance

@pytest.fixture(scope='module')
def ray_instance():
    "A local Ray instance for the module: two CPUs, two logical GPUs, loopback, no dashboard; its mark."
    ray = pytest.importorskip('ray', reason="the Ray backend needs ray: pip install -e '.[ray]'")
    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    mark = uuid.uuid4().hex
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _node_ip_address='127.0.0.1',
             runtime_env={'env_vars': {RAY_MARK_ENV: mark}})
    yield mark
    ray.shutdown()

def token_carriers(mark: str) -> list:
    ("Our workers on the Ray instance marked `mark`, and whatever they started: "
     "processes with a worker's token.")
    out = []  # other programs on this machine (another test run) have workers with tokens too: not ours
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if TOKEN_ENV in env and env.get(RAY_MARK_ENV) == mark: out.append(p)
        except (psutil.Error, OSError): pass
    return out

def live_hosts() -> list:
    "Host actors Ray does not count as dead (the state API without a dashboard: the GCS's actor table)."
    import ray
    return [a for a in ray._private.state.actors().values()
            if a['ActorClassName'] == 'RayWorkerHost' and a['State'] != 'DEAD']

def assert_nothing_left_on_ray(mark: str):
    "No host actor, no worker process (nor anything a worker started), every GPU free; what is left is ended."
    import ray
    def left(): return token_carriers(mark), live_hosts(), ray.available_resources().get('GPU')
    deadline = time.monotonic() + 10
    while left() != ([], [], 2.0) and time.monotonic() < deadline: time.sleep(0.05)
    procs, hosts, gpus = left()
    for p in procs:  # ours, by the mark: ended so that the next test starts clean
        try: p.kill()
        except psutil.Error: pass
    assert not procs and not hosts and gpus == 2.0, \
        f"left behind: processes {[p.pid for p in procs]}, {len(hosts)} actors, {2.0 - (gpus or 0)} GPUs held"

@pytest.fixture(params=['process', 'ray'])
def backend(request):
    "Run the test on each backend: worker subprocesses of the app, and workers on a local Ray instance."
    if request.param == 'ray':
        mark = request.getfixturevalue('ray_instance')
        request.addfinalizer(lambda: assert_nothing_left_on_ray(mark))
    return request.param
