"Shared fixtures: every process test ends by asserting that no child process is left."
import socket, subprocess, time
from pathlib import Path
import psutil, pytest

def _is_resource_tracker(p: psutil.Process) -> bool:
    "multiprocessing's resource tracker lives as long as the test session; it is not a leak."
    try: return any('resource_tracker' in part for part in p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess): return False

def live_children() -> list:
    "This process's descendants that still run, the resource tracker excepted."
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and not _is_resource_tracker(p): out.append(p)
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

def kill_tree(proc: subprocess.Popen):
    "After a failure: kill an app and what it started (under --reload, the server is a child that would outlive it)."
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
        assert proc.poll() is None, f"{cmd[1:2]} exited with {proc.returncode}:\n{(cwd/'app.log').read_text()}"
        try:
            if httpx.get(f'http://127.0.0.1:{port}/', timeout=2).status_code == 200: return proc
        except httpx.HTTPError: pass
        time.sleep(0.1)
    kill_tree(proc)
    raise AssertionError(f"the app did not answer within {timeout} s:\n{(cwd/'app.log').read_text()}")

def free_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on now."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
