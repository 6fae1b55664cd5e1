"""The workers page (extensions.fasthtml.workers_page) in headless Chromium: one row per worker, a progress
bar that moves, a cancel and a recycle from the page, the guard's 403; screenshots are kept in
tests/artifacts/."""
import os, signal, subprocess, sys, time
from pathlib import Path

import httpx, pytest
from conftest import free_port, kill_tree, start_web_app

pytest.importorskip('prometheus_client', reason="the metrics extra: pip install -e '.[metrics]'")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent/'artifacts'
CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic']

def cell(page, worker:int, what:str): return page.locator(f'#wp-w{worker}-{what}')

def record_progress(page, worker:int):
    "Record in `window.__progress` every value worker `worker`'s progress bar takes from now on."
    page.evaluate('''w => { window.__progress = [];
        const note = () => { const v = document.querySelector(`#wp-w${w}-progress progress`)'''
                  '''?.getAttribute('value');
                             if (v != null && window.__progress.at(-1) !== v) window.__progress.push(v); };
        new MutationObserver(note).observe(document.body, {subtree: true, childList: true, attributes: true});
        note(); }''', worker)

def submit(base:str, plugin:str, **params) -> str:
    return httpx.post(f'{base}/submit/{plugin}', params=params, timeout=10).json()['job_id']

def status(base:str, job_id:str) -> str: return httpx.get(f'{base}/job/{job_id}', timeout=10).json()['status']

@pytest.mark.browser
@pytest.mark.timeout(300)
def test_workers_page_in_browser(tmp_path, no_leftover_processes):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package to run the browser test")
    from playwright.sync_api import sync_playwright, expect
    expect.set_options(timeout=20_000)
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    base = f'http://127.0.0.1:{port}'
    app = start_web_app([sys.executable, str(ROOT/'tests'/'workers_app.py'), str(port)], tmp_path, port,
                        {**os.environ,
                         'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])})
    requests = []
    try:
        # the guard: no operator cookie, no page, no stream, no control
        assert httpx.get(f'{base}/workers').status_code == 403
        assert httpx.get(f'{base}/workers/events').status_code == 403
        assert httpx.post(f'{base}/workers/workers/0/recycle').status_code == 403
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={'width': 1400, 'height': 760})
            context.add_cookies([{'name': 'operator', 'value': 'yes', 'url': base}])
            context.on('request', lambda r: requests.append(r.url))
            page = context.new_page()
            page.add_init_script(
                "document.addEventListener('htmx:sseOpen', () => { window.__sseOpen = true })")
            page.goto(f'{base}/workers')
            page.wait_for_function('window.__sseOpen === true')
            expect(page.locator('table.workers tbody tr')).to_have_count(2)
            expect(cell(page, 0, 'state')).to_have_text('idle')
            expect(cell(page, 1, 'state')).to_have_text('idle')
            pids = [cell(page, i, 'pid').inner_text() for i in (0, 1)]
            assert all(p.isdigit() for p in pids), pids

            # a job with progress: its row shows it, and the bar moves without a reload
            slow = submit(base, 'progress', seconds=4, steps=20)
            page.wait_for_function("id => [0, 1].some(w => document.getElementById(`wp-w${w}-job`)"
                                   ".textContent.includes(id))", arg=slow)
            worker = 0 if slow in cell(page, 0, 'job').inner_text() else 1
            record_progress(page, worker)
            expect(cell(page, worker, 'state')).to_have_text('busy')
            page.wait_for_function('window.__progress.length >= 3')
            values = [int(v) for v in page.evaluate('window.__progress')]
            assert values == sorted(values) and values[-1] > values[0], values
            expect(page.locator('#wp-queue')).to_contain_text('progress')
            page.screenshot(path=str(ARTIFACTS/'workers-page.png'), full_page=True)

            # a hanging job, cancelled from the page: its worker is replaced, the cancel counted in its row
            hang = submit(base, 'hang')
            other = 1 - worker
            expect(cell(page, other, 'job')).to_contain_text(hang)
            cell(page, other, 'job').get_by_role('button', name='Cancel').click()
            expect(page.locator('#wp-notice')).to_have_text(f'Job {hang} cancelled.')
            expect(cell(page, other, 'cancels')).to_have_text('1')
            expect(cell(page, other, 'state')).to_have_text('idle')
            assert status(base, hang) == 'cancelled'
            assert cell(page, other, 'pid').inner_text() != pids[other]

            # a failure shows with its error; a recycle from the page gives the worker a new process
            failed = submit(base, 'fail', message='the model said no')
            expect(page.locator('#wp-failures')).to_contain_text('the model said no')
            assert failed in page.locator('#wp-failures').inner_text()
            expect(cell(page, worker, 'state')).to_have_text('idle', timeout=30_000)
            before = cell(page, worker, 'pid').inner_text()
            cell(page, worker, 'actions').get_by_role('button', name='Recycle').click()
            expect(page.locator('#wp-notice')).to_contain_text(f'Worker {worker} is replaced')
            expect(cell(page, worker, 'pid')).not_to_have_text(before)
            expect(cell(page, worker, 'state')).to_have_text('idle')
            page.screenshot(path=str(ARTIFACTS/'workers-page-after.png'), full_page=True)

            # both busy, one more waiting: the picture in the README (docs/workers-page.png)
            for _ in range(3): submit(base, 'progress', seconds=6, steps=60)
            expect(page.locator('#wp-queue')).to_contain_text('progress')
            page.wait_for_function("() => ['#wp-w0-progress', '#wp-w1-progress']"
                                   ".every(s => document.querySelector("
                                   "`${s} progress`)?.getAttribute('value') >= 20)")
            page.locator('main').screenshot(path=str(ARTIFACTS/'workers-page-busy.png'))
            browser.close()
        assert all(u.startswith(base) or u.startswith('data:') for u in requests), "a request left the app"
        metrics = httpx.get(f'{base}/metrics').text
        assert 'cjm_jobs_total{plugin="hang",status="cancelled",worker_type="text"} 1.0' in metrics
        assert 'cjm_jobs_total{plugin="fail",status="failed",worker_type="text"} 1.0' in metrics
    finally:
        if app.poll() is None:
            app.send_signal(signal.SIGINT)
            try: app.wait(20)
            except subprocess.TimeoutExpired: kill_tree(app)
    assert app.returncode == 0, (tmp_path/'app.log').read_text()
