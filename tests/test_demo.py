"demo_app.py driven in headless Chromium, and run as a command that Ctrl+C stops cleanly."
import os, re, signal, socket, subprocess, sys, time
from pathlib import Path
from urllib.parse import urlsplit

import httpx, psutil, pytest
from conftest import pid_gone

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', '--no-first-run', '--disable-quic']
SCRIPT_TEXT = '<script>window.__pwned = 1</script><b>bold</b>'

def status(name:str) -> re.Pattern:
    "Matches a job card's class list holding `name` (htmx adds classes of its own while it swaps)."
    return re.compile(rf'(^|\s){name}(\s|$)')

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def start_app(cwd:Path, port:int, timeout:float=30.0) -> subprocess.Popen:
    "Run `python demo_app.py PORT` in `cwd` (its output in `cwd/app.log`); return once its page answers."
    log = open(cwd/'app.log', 'w')
    proc = subprocess.Popen([sys.executable, str(ROOT/'demo_app.py'), str(port)], cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"demo_app.py exited with {proc.returncode}:\n{(cwd/'app.log').read_text()}"
        try:
            if httpx.get(f'http://127.0.0.1:{port}/', timeout=2).status_code == 200: return proc
        except httpx.HTTPError: pass
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError(f"demo_app.py did not answer within {timeout} s:\n{(cwd/'app.log').read_text()}")

def worker_pids(proc:subprocess.Popen) -> list:
    "pids of the app's multiprocessing children (the worker; the resource tracker ends by itself)."
    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True) if 'spawn_main' in ' '.join(p.cmdline())]

def stop_app(proc:subprocess.Popen, sig:int=signal.SIGINT, timeout:float=15.0):
    "Ctrl+C the app (or send it `sig`); it must exit by itself, with status 0."
    proc.send_signal(sig)
    try: proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"demo_app.py still ran {timeout} s after {signal.Signals(sig).name}")
    assert proc.returncode == 0, f"exit status {proc.returncode}"

# ----- the page in a real browser --------------------------------------------------------------------------------
def submit(page, plugin_id:str, text:str):
    "Submit a job from the form; return the locator of its new card."
    before = page.locator('#jobs article').evaluate_all('els => els.map(e => e.id)')
    page.select_option('select[name=plugin_id]', plugin_id)
    page.fill('input[name=text]', text)
    page.get_by_role('button', name='Submit job').click()
    page.wait_for_function("before => [...document.querySelectorAll('#jobs article')].some(e => !before.includes(e.id))", arg=before)
    new = [i for i in page.locator('#jobs article').evaluate_all('els => els.map(e => e.id)') if i not in before]
    assert len(new) == 1, new
    return page.locator(f'#{new[0]}')

def watch(card, script:str, until_status:str, timeout:float=20.0) -> list:
    "Values of `script` run on the card, sampled until the card shows `until_status`."
    from playwright.sync_api import expect
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        # one evaluation reads the card and its status together: events replace the card at any moment
        value, done = card.evaluate(f"card => [({script})(card), card.classList.contains('{until_status}')]")
        seen.append(value)
        if done: break
        time.sleep(0.03)
    expect(card).to_have_class(status(until_status))
    return seen

def worker_field(page, name:str):
    return page.locator('#worker tr').filter(has=page.locator('th', has_text=re.compile(f'^{name}$'))).locator('td')

@pytest.mark.browser
def test_demo_in_browser(tmp_path, no_leftover_processes):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package to run the browser test")
    from playwright.sync_api import sync_playwright, expect
    expect.set_options(timeout=20_000)
    port = free_port()
    url = f'http://127.0.0.1:{port}/'
    app = start_app(tmp_path, port)
    requests = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={'width': 1280, 'height': 1000})
            context.on('request', lambda r: requests.append(r.url))
            page = context.new_page()
            page.add_init_script("document.addEventListener('htmx:sseOpen', () => { window.__sseOpen = true })")
            page.goto(url)
            page.wait_for_function('window.__sseOpen === true')
            expect(worker_field(page, 'state')).to_have_text('idle')
            first_pid = worker_field(page, 'pid').inner_text()

            # a quick job completes, and its result arrives without a reload
            card = submit(page, 'demo-quick', 'hello browser')
            expect(card).to_have_class(status('completed'))
            expect(card.locator('pre.result')).to_have_text('HELLO BROWSER')
            expect(worker_field(page, 'loaded plugin')).to_have_text('quick')

            # the progress bar moves, then reaches 100 %
            card = submit(page, 'demo-slow', 'count these words')
            values = watch(card, "c => c.querySelector('progress')?.getAttribute('value')", 'completed')
            expect(card.locator('progress')).to_have_attribute('value', '100')
            expect(card.locator('.pct')).to_have_text('100 %')
            partial = {int(v) for v in values if v is not None and 0 < int(v) < 100}
            assert len(partial) >= 2, f"progress seen: {values}"

            # streamed text grows word by word
            words = 'one two three four five six seven eight nine ten eleven twelve'
            card = submit(page, 'demo-stream', words)
            texts = watch(card, "c => c.querySelector('pre.output')?.textContent ?? ''", 'completed')
            grown = [t for i, t in enumerate(texts) if t and (i == 0 or t != texts[i - 1])]
            assert len(grown) >= 3 and all(words.startswith(t.strip()) for t in grown), f"stream seen: {grown}"
            expect(card.locator('pre.result')).to_have_text(words)

            # cancel a pending job (the worker stays), then the running one (the worker is replaced)
            running = submit(page, 'demo-stream', ' '.join(['long'] * 100))  # 15 s of streaming
            pending = submit(page, 'demo-slow', 'to cancel while waiting')
            expect(running.locator('pre.output')).to_contain_text('long long')
            expect(pending).to_have_class(status('pending'))
            pid = worker_field(page, 'pid').inner_text()
            pending.get_by_role('button', name='Cancel').click()
            expect(pending).to_have_class(status('cancelled'))
            assert 'running' in running.get_attribute('class').split() and worker_field(page, 'pid').inner_text() == pid
            running.get_by_role('button', name='Cancel').click()
            expect(running).to_have_class(status('cancelled'))
            assert 0 < running.locator('pre.output').inner_text().count('long') < 100
            expect(worker_field(page, 'pid')).not_to_have_text(pid)
            expect(worker_field(page, 'state')).to_have_text('idle')
            assert pid == first_pid

            # the crash plugin fails its job with the exit code, and a new worker comes back
            pid, restarts = worker_field(page, 'pid').inner_text(), int(worker_field(page, 'restarts').inner_text())
            card = submit(page, 'demo-crash', 'crash')
            expect(card).to_have_class(status('failed'))
            expect(card.locator('.error')).to_contain_text('exited with code 13')
            expect(worker_field(page, 'pid')).not_to_have_text(pid)
            expect(worker_field(page, 'restarts')).to_have_text(str(restarts + 1))
            expect(worker_field(page, 'state')).to_have_text('idle')
            expect(page.locator('#resources')).to_contain_text(worker_field(page, 'pid').inner_text())

            # user text is shown as text: no script runs, no tag is made
            card = submit(page, 'demo-quick', SCRIPT_TEXT)
            expect(card).to_have_class(status('completed'))
            expect(card.locator('p.input')).to_have_text(SCRIPT_TEXT)
            expect(card.locator('pre.result')).to_have_text(SCRIPT_TEXT.upper())
            card = submit(page, 'demo-fail', SCRIPT_TEXT)
            expect(card).to_have_class(status('failed'))
            expect(card.locator('.error')).to_contain_text(SCRIPT_TEXT)
            assert page.locator('#jobs script, #jobs b').count() == 0
            assert page.evaluate('window.__pwned') is None

            # reload a plugin with its next configuration, then unload it
            page.locator('#plugins tr', has_text='Quick').get_by_role('button', name='Reload').click()
            expect(page.locator('#plugins .note')).to_have_text('Reloaded quick with {"mode": "reverse"}.')
            expect(page.locator('#plugins tr', has_text='Quick').locator('code')).to_have_text('{"mode": "reverse"}')
            card = submit(page, 'demo-quick', 'abc')
            expect(card.locator('pre.result')).to_have_text('cba')
            page.locator('#plugins tr', has_text='Quick').get_by_role('button', name='Unload').click()
            expect(page.locator('#plugins .note')).to_have_text('Unloaded quick.')
            expect(worker_field(page, 'loaded plugin')).to_have_text('none')

            # resources: GPUs (or why there is none), system memory, the app's processes
            resources = page.locator('#resources')
            expect(resources).to_contain_text(re.compile(r'GPU 0|No GPU: .+'))
            expect(resources).to_contain_text('system memory')
            expect(resources).to_contain_text('app server')
            expect(resources).to_contain_text('worker: idle')

            page.screenshot(path=tmp_path/'demo.png', full_page=True)
            page.get_by_role('button', name='Clear finished').click()
            expect(page.locator('#jobs')).to_have_text('No jobs yet: pick a plugin and submit one.')
            # Ctrl+C with the page still connected to the event stream
            stop_app(app)
            browser.close()
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    outside = [u for u in requests if urlsplit(u).scheme != 'data' and urlsplit(u).hostname != '127.0.0.1']
    assert not outside, f"requests that left 127.0.0.1: {outside}"
    paths = {urlsplit(u).path for u in requests}
    assert {'/events', '/static/htmx.min.js', '/static/htmx-ext-sse.min.js', '/static/demo.css'} <= paths, paths
    assert sorted(p.name for p in tmp_path.iterdir()) == ['app.log', 'demo.png']  # no .sesskey or other litter
    log = (tmp_path/'app.log').read_text()
    assert log.rstrip().endswith('demo stopped') and 'Traceback' not in log and 'leaked' not in log, log

# ----- the command ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_demo_app_command(tmp_path, sig, no_leftover_processes):
    port = free_port()
    app = start_app(tmp_path, port)
    try:
        assert f'http://127.0.0.1:{port}' in (tmp_path/'app.log').read_text()
        page = httpx.get(f'http://127.0.0.1:{port}/', timeout=5)
        assert 'cjm-fasthtml-workers demo' in page.text
        assert not re.search(r'''(src|href)=["']?(https?:)?//''', page.text)  # every script and link is local
        assert httpx.get(f'http://127.0.0.1:{port}/static/htmx-ext-sse.min.js', timeout=5).status_code == 200
        workers = worker_pids(app)
        assert len(workers) == 1
        with httpx.stream('GET', f'http://127.0.0.1:{port}/events', timeout=10) as events:  # an open event stream
            first = next(events.iter_lines())
            assert first.startswith('data: ')
            stop_app(app, sig)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    assert pid_gone(workers[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['app.log']  # no .sesskey or other litter
    log = (tmp_path/'app.log').read_text()
    assert log.rstrip().endswith('demo stopped') and 'Traceback' not in log and 'leaked' not in log, log

# ----- the GPU rows, with a fake NVML (this machine may have no GPU) ---------------------------------------------
def test_resources_panel_shows_gpus():
    import importlib.util
    from fasthtml.common import to_xml
    from cjm_fasthtml_workers.extensions.resources import FakeNVML, ResourceManager
    spec = importlib.util.spec_from_file_location('demo_app_under_test', ROOT/'demo_app.py')
    demo_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_app)  # builds the app and its manager; starts nothing
    try:
        gpu = FakeNVML.gpu(80 << 30, {4321: 3 << 30}, name='Fake H100', utilization=7)  # pid 4321 is not the app's
        demo_app.resources = ResourceManager(nvml=FakeNVML([gpu]))
        html = to_xml(demo_app.ResourcesPanel())
        for text in ['GPU 0', 'Fake H100', '3.0 GiB of 80.0 GiB', '7 %', 'free: processes outside the app use 3.8%', 'app server']:
            assert text in html, text
        assert 'No GPU' not in html
        demo_app.resources = ResourceManager(nvml=FakeNVML(init_error='Driver Not Loaded'))
        assert 'No GPU: NVML could not be initialised: Driver Not Loaded' in to_xml(demo_app.ResourcesPanel())
    finally: demo_app.manager.shutdown()
