"""extensions.fasthtml in real servers: the README's app under serve() and uvicorn, reloaded and stopped with
Ctrl+C; a client that does not read; the exit-signal handler."""
import asyncio, os, re, signal, socket, subprocess, sys, threading, time
from pathlib import Path

import httpx, psutil, pytest
from conftest import kill_tree, pid_gone, start_web_app, free_port, stop
from helpers import readme_app

from cjm_fasthtml_workers.core.worker import TOKEN_ENV
from cjm_fasthtml_workers.extensions.fasthtml import SSEBroadcaster, sse_response


def start(cwd:Path, port:int, runner:str, timeout:float=30.0) -> subprocess.Popen:
    "Run app.py in `cwd` as `python app.py` (serve) or `uvicorn app:app`; return once its page answers."
    cmd = ([sys.executable, 'app.py'] if runner == 'serve' else
           [sys.executable, '-m', 'uvicorn', 'app:app', '--host', '127.0.0.1', '--port', str(port)])
    return start_web_app(cmd, cwd, port, {**os.environ, 'PORT': str(port)}, timeout)

def descendants(proc) -> list: return [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]

def workers(proc) -> list:
    "pids of the app's job workers: spawned processes that carry the manager's token (not uvicorn's server)."
    def is_worker(p):
        try: return 'spawn_main' in ' '.join(p.cmdline()) and TOKEN_ENV in p.environ()
        except psutil.Error: return False
    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True) if is_worker(p)]

class Stream:
    "An open /events stream read on a thread: the SSE messages so far, and whether it has ended."
    def __init__(self, url:str, client=httpx): # client: an httpx.Client, for its session cookie
        self.messages, self.ended, self.opened, self.client = [], threading.Event(), threading.Event(), client
        self.thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self.thread.start()
        assert self.opened.wait(10), "the event stream did not open"

    def _read(self, url):
        try:
            with self.client.stream('GET', url, timeout=httpx.Timeout(5, read=60)) as r:
                self.opened.set()
                lines = []
                for line in r.iter_lines():
                    if line.startswith('data: '): lines.append(line[6:])
                    elif not line and lines: self.messages.append('\n'.join(lines)); lines = []
        except httpx.HTTPError: pass
        finally: self.ended.set()

    def wait_for(self, pattern:str, timeout:float=20.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if found := re.search(pattern, m, re.S): return found
            time.sleep(0.05)
        raise AssertionError(f"no message matching {pattern!r} within {timeout} s: {self.messages}")

def run_one_job(base:str, stream:Stream) -> str:
    ("Submit a job in the stream's session (its client's cookie); follow it on the stream to completed; "
     "return its id.")
    assert stream.client.post(f'{base}/jobs', data={'text': 'hi <there>'}, timeout=5).status_code == 200
    # its row, added
    job_id = stream.wait_for(r'hx-swap-oob="beforeend:#jobs">\s*<li id="job-(\w+)"').group(1)
    stream.wait_for(rf'<strong>running</strong> {job_id}: [1-9]\d* %')  # a progress event
    stream.wait_for(rf'<strong>completed</strong> {job_id}: hi &lt;there&gt;')
    return job_id

@pytest.mark.parametrize('runner', ['serve', 'uvicorn'])
def test_readme_app(tmp_path, runner, no_leftover_processes):
    (tmp_path/'app.py').write_text(readme_app())
    port = free_port()
    base = f'http://127.0.0.1:{port}'
    proc = start(tmp_path, port, runner)
    try:
        # keeps the session cookie: the page, its stream and its jobs are one owner's
        browser = httpx.Client()
        page = browser.get(base + '/', timeout=5).text
        assert '/cjm-workers/htmx.min.js' in page and not re.search(r'src="(https?:)?//', page)
        assert httpx.get(base + '/cjm-workers/htmx-ext-sse.min.js', timeout=5).status_code == 200
        stream = Stream(base + '/events', browser)
        job_id = run_one_job(base, stream)
        # the list after a reload
        assert f'{job_id}: hi &lt;there&gt;' in browser.get(base + '/', timeout=5).text
        assert job_id not in httpx.get(base + '/', timeout=5).text  # another session's page does not list it
        started = descendants(proc)
        assert workers(proc), started
        took = stop(proc)  # the stream is still open
        assert stream.ended.wait(2), "the event stream outlived the server"
    finally:
        kill_tree(proc)
    assert took < 5, f"Ctrl+C took {took:.1f} s"
    assert all(pid_gone(pid) for pid in started), [p for p in started if psutil.pid_exists(p)]
    log = (tmp_path/'app.log').read_text()
    assert 'Waiting for connections to close' not in log and 'Traceback' not in log, log

def test_readme_app_reload(tmp_path, no_leftover_processes):
    "serve() reloads on a change: the open stream ends, the old worker goes, a new one runs the next job."
    (tmp_path/'app.py').write_text(readme_app())
    port = free_port()
    base = f'http://127.0.0.1:{port}'
    proc = start(tmp_path, port, 'serve')
    try:
        stream = Stream(base + '/events')
        old = workers(proc)
        assert len(old) == 1, old
        (tmp_path/'app.py').write_text(readme_app() + '\n# changed\n')
        assert stream.ended.wait(15), "the event stream kept the old server from reloading"
        assert pid_gone(old[0]), "the old worker outlived the reload"
        deadline = time.monotonic() + 20
        while not ((new := workers(proc)) and new != old) and time.monotonic() < deadline: time.sleep(0.1)
        assert new and new != old, (old, new)
        stream = Stream(base + '/events', httpx.Client())
        run_one_job(base, stream)
        started = descendants(proc)
        stop(proc)
    finally:
        kill_tree(proc)
    assert all(pid_gone(pid) for pid in started)
    log = (tmp_path/'app.log').read_text()
    assert ('Reloading' in log and 'Waiting for connections to close' not in log
            and 'Traceback' not in log), log

def test_a_client_that_does_not_read_is_dropped(caplog):
    "A client that stops reading fills its socket, then its queue: it is dropped; broadcast never waits."
    import uvicorn
    from fasthtml.common import FastHTML, Pre
    events = SSEBroadcaster(max_queue=20)
    app = FastHTML(default_hdrs=False, secret_key='x')
    big = 'x' * 50_000  # a few of these fill the socket buffers

    @app.get('/events')
    def stream(): return sse_response(events, lambda e: Pre(big))

    @app.post('/burst')
    async def burst():
        t0 = time.monotonic()
        for i in range(500): await events.broadcast('text:progress', {'job_id': 'a', 'progress': i / 500})
        return f"{time.monotonic() - t0:.4f}"

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning'))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline: time.sleep(0.05)
        with socket.create_connection(('127.0.0.1', port)) as lazy:  # asks for the stream, never reads it
            lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            lazy.sendall(f'GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n'.encode())
            while not events.clients: time.sleep(0.01)
            seconds = [float(httpx.post(f'http://127.0.0.1:{port}/burst', timeout=10).text) for _ in range(3)]
            deadline = time.monotonic() + 10
            while events.clients and time.monotonic() < deadline: time.sleep(0.05)
            assert events.dropped == 1 and not events.clients, events
        assert max(seconds) < 0.5, seconds  # 500 events to a stuck client, handed off at once
        assert any('dropped an SSE client 20 events behind' in r.getMessage() for r in caplog.records)
    finally:
        server.should_exit = True
        thread.join(10)

def test_exit_signal_ends_the_streams():
    "The handler in front of the server's: Ctrl+C ends the streams, then the server's own handler runs."
    seen = []
    before = signal.signal(signal.SIGINT, lambda sig, frame: seen.append(sig))
    try:
        async def main():
            events = SSEBroadcaster()
            messages = events.stream(lambda e: 'x')
            reading = asyncio.ensure_future(anext(messages))
            await asyncio.sleep(0.01)  # the stream has subscribed, and put its handler in front
            signal.raise_signal(signal.SIGINT)
            with pytest.raises(StopAsyncIteration): await asyncio.wait_for(reading, 2)
            return events
        events = asyncio.run(main())
        assert seen == [signal.SIGINT] and events.closed and not events.clients
    finally: signal.signal(signal.SIGINT, before)

def test_the_core_does_not_import_fasthtml():
    "FastHTML is optional: only extensions.fasthtml (and the demo app) import it."
    code = ("import sys, cjm_fasthtml_workers.managers.base, cjm_fasthtml_workers.managers.store, "
            "cjm_fasthtml_workers.extensions.resources, cjm_fasthtml_workers.demo, "
            "cjm_fasthtml_workers.testing\n"
            "print(sorted(m for m in ('fasthtml', 'starlette', 'uvicorn') if m in sys.modules))")
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True).stdout.strip() == '[]'
