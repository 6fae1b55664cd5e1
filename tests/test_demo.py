"demo_app.py driven in headless Chromium, and run as a command that Ctrl+C stops cleanly."
import importlib.util, os, re, signal, stat, subprocess, sys, time
from html import escape
from pathlib import Path
from urllib.parse import urlsplit

import httpx, psutil, pytest
from conftest import kill_tree, pid_gone, start_web_app, free_port

from cjm_fasthtml_workers.core.worker import TOKEN_ENV

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update',
                 '--disable-sync', '--no-first-run', '--disable-quic']
SCRIPT_TEXT = '<script>window.__pwned = 1</script><b>bold</b>'
HAS_SPEECH = importlib.util.find_spec('pocketsphinx') is not None

def status(name:str) -> re.Pattern:
    "Matches a job card's class list holding `name` (htmx adds classes of its own while it swaps)."
    return re.compile(rf'(^|\s){name}(\s|$)')

def start_app(cwd:Path, port:int, data:Path, timeout:float=30.0) -> subprocess.Popen:
    ("Run `python demo_app.py PORT` in `cwd` (its output in `cwd/app.log`, its store in `data`); "
     "return once it answers.")
    return start_web_app([sys.executable, str(ROOT/'demo_app.py'), str(port)], cwd, port,
                         {**os.environ, 'CJM_DEMO_DATA': str(data)}, timeout)

def worker_pids(proc:subprocess.Popen) -> list:
    "pids of the app's job workers (spawned, with the manager's token; the resource tracker ends by itself)."
    def is_worker(p):
        try: return 'spawn_main' in ' '.join(p.cmdline()) and TOKEN_ENV in p.environ()
        except psutil.Error: return False
    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True) if is_worker(p)]

def stop_app(proc:subprocess.Popen, sig:int=signal.SIGINT, timeout:float=15.0):
    "Ctrl+C the app (or send it `sig`); it must exit by itself, with status 0."
    proc.send_signal(sig)
    try: proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"demo_app.py still ran {timeout} s after {signal.Signals(sig).name}")
    assert proc.returncode == 0, f"exit status {proc.returncode}"

def check_log(path:Path, stops:int=1):
    log = path.read_text()
    assert log.count('demo stopped') == stops and log.rstrip().endswith('demo stopped'), log
    assert 'Traceback' not in log and 'leaked' not in log and 'Waiting for connections' not in log, log

# ----- the page in a real browser ---------------------------------------------------------------------------
def card_ids(page) -> list: return page.locator('#jobs article').evaluate_all('els => els.map(e => e.id)')

def submit(page, plugin_id:str, text:str):
    "Submit a job from the form; return the locator of its new card."
    before = card_ids(page)
    page.select_option('select[name=plugin_id]', plugin_id)
    page.fill('input[name=text]', text)
    page.get_by_role('button', name='Submit job').click()
    page.wait_for_function("before => [...document.querySelectorAll('#jobs article')].some(e => "
                           "!before.includes(e.id))",
                           arg=before)
    new = [i for i in card_ids(page) if i not in before]
    assert len(new) == 1, new
    return page.locator(f'#{new[0]}')

def watch(card, script:str, until_status:str, timeout:float=30.0) -> list:
    "Values of `script` run on the card, sampled until the card shows `until_status`."
    from playwright.sync_api import expect
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        value, done = card.evaluate(f"card => [({script})(card), card.classList.contains('{until_status}')]")
        seen.append(value)
        if done: break
        time.sleep(0.03)
    expect(card).to_have_class(status(until_status))
    return seen

def record_progress(page, card):
    ("Record, in `window.__progress`, every value the card's progress bar takes from now on, "
     "whatever is swapped in.")
    page.evaluate('''id => { window.__progress = [];
        const note = () => {
            const v = document.getElementById(id)?.querySelector('progress')?.getAttribute('value');
            if (v != null && window.__progress.at(-1) !== v) window.__progress.push(v); };
        new MutationObserver(note).observe(document.getElementById('jobs'),
                                           {subtree: true, childList: true, attributes: true});
        note(); }''', card.get_attribute('id'))

def worker(page, field:str, n:int):
    "Worker `n`'s cell of `field` (a key of get_workers_info) in the workers panel."
    return page.locator(f'#workers tr[data-field={field}] td').nth(n)

def workers(page,
            field:str) -> list: return page.locator(f'#workers tr[data-field={field}] td').all_inner_texts()

def runs_on(page, card) -> int:
    "Which worker runs the card's job."
    job_id = card.get_attribute('id').removeprefix('job-')
    page.wait_for_function("id => [...document.querySelectorAll('#workers tr[data-field=current_job_id] td')]"
                           ".some(td => td.textContent === id)", arg=job_id)
    return workers(page, 'current_job_id').index(job_id)

def open_page(context, url):
    page = context.new_page()
    page.add_init_script("""window.__messages = [];
        document.addEventListener('htmx:sseOpen', () => { window.__sseOpen = true });
        document.addEventListener('htmx:sseMessage', e => window.__messages.push(e.detail.data.length));""")
    page.goto(url)
    caught_up(page)
    return page

def caught_up(page):
    "Wait until the page's event stream is open and its first message, the page as it is now, is in."
    page.wait_for_function('window.__sseOpen === true && window.__messages.length > 0')

@pytest.mark.browser
@pytest.mark.timeout(400)
def test_demo_in_browser(tmp_path, no_leftover_processes):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package to run the browser test")
    from playwright.sync_api import sync_playwright, expect
    expect.set_options(timeout=20_000)
    port, data, cwd = free_port(), tmp_path/'data', tmp_path/'cwd'
    cwd.mkdir()
    url = f'http://127.0.0.1:{port}/'
    app = start_app(cwd, port, data)
    requests = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={'width': 1280, 'height': 1000})
            context.on('request', lambda r: requests.append(r.url))
            page = open_page(context, url)
            expect(page.locator('#workers tr[data-field=state] td')).to_have_text(['idle', 'idle'])
            # the counts below it are the slot's, whichever of its processes did the work
            expect(page.locator('#workers th.group')).to_have_text('since the app started')
            first_pids = workers(page, 'pid')
            # gone if the list is drawn again
            page.evaluate("document.getElementById('jobs').__mark = 'the list'")

            # a quick job completes, and its result arrives without a reload
            card = submit(page, 'demo-quick', 'hello browser')
            expect(card).to_have_class(status('completed'))
            expect(card.locator('pre.result')).to_have_text('HELLO BROWSER')
            assert 'quick' in workers(page, 'loaded_plugin')

            # another browser is another visitor (session): neither sees, nor may cancel, the other's jobs
            other_context = browser.new_context(viewport={'width': 1280, 'height': 1000})
            other_context.on('request', lambda r: requests.append(r.url))
            other = open_page(other_context, url)
            expect(other.locator('#jobs')).to_have_text('No jobs yet: pick a plugin and submit one.')
            theirs = submit(other, 'demo-quick', 'from the other visitor')
            expect(theirs).to_have_class(status('completed'))
            mine = card.get_attribute('id').removeprefix('job-')
            answer = other.request.post(f'{url}jobs/{mine}/cancel')
            assert answer.status == 404 and f'There is no job {mine}.' in answer.text(), answer.text()
            assert re.fullmatch(r'job-[0-9a-f]{32}', theirs.get_attribute('id'))  # uuid4().hex: not guessed

            # while a job runs, the panels follow it: its worker is busy with it, the resources are read again
            card = submit(page, 'demo-slow', 'count these words')
            record_progress(page, card)  # from now on, whatever the checks below take on a loaded machine
            n = runs_on(page, card)
            expect(worker(page, 'state', n)).to_have_text('busy')
            read_at = page.locator('#read-at').inner_text()
            expect(page.locator('#read-at')).not_to_have_text(read_at)  # every 2 s while a page is open
            expect(page.locator('#resources')).to_contain_text(f'worker {n}: busy, slow loaded')
            # the progress bar moves to 100 %
            expect(card).to_have_class(status('completed'))
            values = page.evaluate('window.__progress')
            partial = {int(v) for v in values if 0 < int(v) < 100}
            assert len(partial) >= 2, f"progress seen: {values}"
            expect(card.locator('.pct')).to_have_text('100 %')
            expect(worker(page, 'state', n)).to_have_text('idle')
            expect(worker(page, 'jobs_done', n)).not_to_have_text('0')

            # Cancel works on the first click while progress comes in: its button is not replaced under the
            # mouse
            card = submit(page, 'demo-slow', 'to cancel while it counts')
            # 10 % .. 90 %
            expect(card.locator('progress')).to_have_attribute('value', re.compile(r'^[1-9]\d$'))
            n = runs_on(page, card)
            cancels, pid = worker(page, 'cancels', n).inner_text(), worker(page, 'pid', n).inner_text()
            button = card.get_by_role('button', name='Cancel').element_handle()
            page.wait_for_function("c => c.querySelector('progress').value >= 30", arg=card.element_handle())
            assert button.evaluate('b => b.isConnected'), "a progress event replaced the Cancel button"
            button.click()
            expect(card).to_have_class(status('cancelled'))
            # the plugin stopped at its next check: its worker, with the plugin loaded, stays (issue 22)
            expect(card.locator('.how')).to_have_text('Stopped: its worker and model stay for the next job.')
            expect(worker(page, 'state', n)).to_have_text('idle')
            assert (worker(page, 'pid', n).inner_text(), worker(page, 'cancels', n).inner_text()) == (pid,
                                                                                                      cancels)
            expect(worker(page, 'loaded_plugin', n)).to_have_text('slow')

            # streamed text grows word by word, appended to the same element
            words = 'one two three four five six seven eight nine ten eleven twelve'
            card = submit(page, 'demo-stream', words)
            expect(card.locator('pre.output')).not_to_be_empty()
            card.locator('pre.output').evaluate("p => p.__mark = 'the output'")
            texts = watch(card,
                          "c => [c.querySelector('pre.output')?.textContent ?? '', "
                          "c.querySelector('pre.output')?.__mark]",
                          'completed')
            grown = [t for i, (t, mark) in enumerate(texts) if t and (i == 0 or t != texts[i - 1][0])]
            assert (len(grown) >= 3
                    and all(words.startswith(t.strip()) for t in grown)), f"stream seen: {grown}"
            assert all(mark == 'the output' for t, mark in texts if t), "a chunk drew the output again"
            expect(card.locator('pre.result')).to_have_text(words)

            # a waiting job shows its place in the queue, and is cancelled without touching a worker; a
            # running streaming one stops between two chunks, and its worker stays
            long_stream = submit(page, 'demo-stream', ' '.join(['long'] * 100))  # 15 s of streaming
            # the other worker busy until cancelled below (a 3 s job could end before the checks are done)
            busy = submit(page, 'demo-stream', ' '.join(['busy'] * 200))
            pending = submit(page, 'demo-slow', 'to cancel while waiting')
            second = submit(page, 'demo-quick', 'second in line')
            expect(long_stream.locator('pre.output')).to_contain_text('long long')
            expect(pending).to_have_class(status('pending'))
            expect(page.locator('#waiting')).to_have_text('2 jobs waiting')
            expect(pending.locator('.queue')).to_have_text(
                re.compile(r'^waiting: next in line, about \d+ s$'))
            expect(second.locator('.queue')).to_have_text(re.compile(r'^waiting: 2nd in line, about \d+ s$'))
            pids = workers(page, 'pid')
            pending.get_by_role('button', name='Cancel').click()
            expect(pending).to_have_class(status('cancelled'))
            expect(pending.locator('.queue, .how')).to_have_count(0)  # it never ran: nothing to say of how
            # it moved up
            expect(second.locator('.queue')).to_have_text(re.compile(r'^waiting: next in line'))
            assert workers(page, 'pid') == pids and 'running' in long_stream.get_attribute('class').split()
            n = runs_on(page, long_stream)
            # the other visitor's workers panel shows that a job runs, not whose or which
            expect(worker(other, 'current_job_id', n)).to_have_text("another visitor's job")
            assert page.locator('#jobs article', has_text='from the other visitor').count() == 0
            other_context.close()
            long_stream.get_by_role('button', name='Cancel').click()
            expect(long_stream).to_have_class(status('cancelled'))
            expect(long_stream.locator('.how')).to_contain_text('Stopped')
            assert 0 < long_stream.locator('pre.output').inner_text().count('long') < 100
            expect(worker(page, 'state', n)).not_to_have_text('busy')  # free for the second job, or idle
            assert worker(page, 'pid', n).inner_text() == pids[n]  # the same process, its plugin still loaded
            expect(second).to_have_class(status('completed'))
            busy.get_by_role('button', name='Cancel').click()
            expect(busy).to_have_class(status('cancelled'))

            # the crash plugin fails its job with the exit code; its worker comes back, its crash counted
            card = submit(page, 'demo-crash', 'crash')
            expect(card).to_have_class(status('failed'))
            expect(card.locator('.error')).to_contain_text('exited with code 13')
            crashed = [i for i, t in enumerate(workers(page, 'last_exit')) if 'code 13' in t]
            assert len(crashed) == 1, workers(page, 'last_exit')
            n = crashed[0]
            expect(worker(page, 'crashes', n)).to_have_text('1')
            expect(worker(page, 'state', n)).to_have_text('idle')
            expect(page.locator('#resources')).to_contain_text(worker(page, 'pid', n).inner_text())

            # user text is shown as text: no script runs, no tag is made; a failed job's traceback opens
            card = submit(page, 'demo-quick', SCRIPT_TEXT)
            expect(card).to_have_class(status('completed'))
            expect(card.locator('p.input')).to_have_text(SCRIPT_TEXT)
            expect(card.locator('pre.result')).to_have_text(SCRIPT_TEXT.upper())
            card = submit(page, 'demo-fail', SCRIPT_TEXT)
            expect(card).to_have_class(status('failed'))
            expect(card.locator('.error')).to_contain_text(SCRIPT_TEXT)
            expect(card.locator('pre.traceback')).to_be_hidden()
            card.locator('summary', has_text='Traceback').click()
            expect(card.locator('pre.traceback')).to_be_visible()
            expect(card.locator('pre.traceback')).to_contain_text('RuntimeError: this plugin always fails')
            assert page.locator('#jobs script, #jobs b').count() == 0
            assert page.evaluate('window.__pwned') is None

            # a form's error (a 400) is shown, and the next good answer clears it
            page.select_option('select[name=plugin_id]', 'demo-quick')
            page.locator('select[name=plugin_id] option[value=demo-quick]').evaluate("o => o.value = 'nope'")
            page.get_by_role('button', name='Submit job').click()
            expect(page.locator('#notice')).to_have_text("There is no plugin 'nope'.")
            page.reload()
            caught_up(page)
            page.evaluate("document.getElementById('jobs').__mark = 'the list'")
            card = submit(page, 'demo-quick', 'ok')
            expect(page.locator('#notice')).to_be_empty()

            # reload a plugin with its next configuration, then unload it
            page.locator('#plugins tr', has_text='Quick').get_by_role('button', name='Reload').click()
            expect(page.locator('#plugins .note')).to_have_text('Quick: reloaded with {"mode": "reverse"}.')
            expect(page.locator('#plugins tr',
                                has_text='Quick').locator('code')).to_have_text('{"mode": "reverse"}')
            card = submit(page, 'demo-quick', 'abc')
            expect(card.locator('pre.result')).to_have_text('cba')
            page.locator('#plugins tr', has_text='Quick').get_by_role('button', name='Unload').click()
            expect(page.locator('#plugins .note')).to_have_text('Quick: unloaded.')
            expect(page.locator('#workers tr[data-field=loaded_plugin] td',
                                has_text='quick')).to_have_count(0)
            # a plugin no worker has loaded: said so, not as an error
            # it ended its worker
            page.locator('#plugin-demo-crash').get_by_role('button', name='Unload').click()
            expect(page.locator('#notice')).to_have_text('Crashing was not loaded: there was nothing to '
                                                         'unload.')
            expect(page.locator('#notice')).to_have_class('notice info')
            # Unload waits for the job its worker runs, and the row says so meanwhile
            card = submit(page, 'demo-slow', 'keeps slow loaded')
            runs_on(page, card)
            row = page.locator('#plugin-demo-slow')
            row.get_by_role('button', name='Unload').click()
            expect(row.locator('.waiting')).to_be_visible()
            expect(row.get_by_role('button', name='Unload')).to_be_disabled()
            expect(card).to_have_class(status('completed'))
            expect(page.locator('#plugins .note')).to_have_text('Slow, with progress: unloaded.')
            expect(page.locator('#plugin-demo-slow .waiting')).to_be_hidden()

            # a worker killed: the workers panel and the resources' list of processes change together
            card = submit(page, 'demo-slow', 'its worker is killed')
            n = runs_on(page, card)
            pid = worker(page, 'pid', n).inner_text()
            page.evaluate('''() => { window.__disagree = [];
                const pids = sel => [...document.querySelectorAll(sel)].map(e => e.textContent)
                                        .filter(t => t !== '–').sort().join(' ');
                const check = () => { const w = pids('#workers tr[data-field=pid] td'),
                                            p = pids('#processes tr.worker td:first-child');
                                      if (w !== p)
                                          window.__disagree.push(`workers: ${w}; processes: ${p}`); };
                new MutationObserver(check).observe(document.body,
                                                    {subtree: true, childList: true, characterData: true});
                check(); }''')
            os.kill(int(pid), signal.SIGKILL)
            expect(card).to_have_class(status('failed'))
            expect(worker(page, 'pid', n)).not_to_have_text(pid)
            expect(worker(page, 'state', n)).to_have_text('idle')
            read_at = page.locator('#read-at').inner_text()
            # a reading since, with the new pid's memory
            expect(page.locator('#read-at')).not_to_have_text(read_at)
            assert pid not in page.locator('#processes').inner_text()
            assert page.evaluate('window.__disagree') == []

            # speech recognition on CPU, streamed phrase by phrase (or the page says what to install)
            speech = page.locator('#plugins tr', has_text='Speech recognition')
            if HAS_SPEECH:
                card = submit(page, 'demo-speech', '')
                seen = watch(card,
                             "c => [c.querySelector('pre.output')?.textContent, "
                             "c.querySelector('progress')?.value]",
                             'completed')
                # the first phrase while the rest is being listened to, progress along the way (5.2 s, in real
                # time)
                assert 'speech recognition runs in a worker process' in {text for text, _ in seen}, seen
                assert len({p for _, p in seen if p and p < 100}) >= 5, seen
                expect(card.locator('pre.result')).to_have_text('speech recognition runs in a worker '
                                                                'process one job at a time')
            else:
                expect(speech.locator('.missing')).to_contain_text("pip install -e '.[speech]'")
                expect(page.locator('select[name=plugin_id] option[value=demo-speech]')).to_be_disabled()

            # many jobs: each comes as one card, the list is never drawn again, every message stays small
            before = page.locator('#jobs article.completed').count()
            # posted in the page's session (cookie): a visitor's jobs come to that visitor's pages only
            for i in range(200):
                page.request.post(url + 'jobs', form={'plugin_id': 'demo-quick', 'text': f'job {i}'})
            expect(page.locator('#jobs article.completed')).to_have_count(before + 200, timeout=60_000)
            assert page.evaluate("document.getElementById('jobs').__mark") == 'the list'
            sizes = page.evaluate('window.__messages')[1:]  # after the first, which catches the page up
            assert max(sizes) < 6000, sorted(sizes)[-5:]
            card = submit(page, 'demo-slow', 'still quick to answer')
            expect(card.locator('progress')).to_have_attribute('value', re.compile(r'^[1-9]\d$'))
            card.get_by_role('button', name='Cancel').dblclick()  # an impatient user: no error for it
            expect(card).to_have_class(status('cancelled'))
            page.wait_for_timeout(500)  # for the answer to a second request, had one gone out
            expect(page.locator('#notice')).to_be_empty()

            # long results scroll inside their box
            card = submit(page, 'demo-quick', 'word ' * 399)
            expect(card).to_have_class(status('completed'))  # measured once the result is there and laid out
            expect(card.locator('pre.result')).to_be_visible()
            box = card.locator('pre.result').evaluate('p => [p.scrollHeight, p.clientHeight]')
            assert box[0] > box[1] > 0, box

            # resources: GPUs (or why there is none), system memory, the app's processes
            resources = page.locator('#resources')
            expect(resources).to_contain_text(re.compile(r'GPU 0|No GPU: .+'))
            expect(resources).to_contain_text('system memory')
            expect(resources).to_contain_text('app server')
            expect(resources).to_contain_text(re.compile(r'worker \d: idle'))
            page.screenshot(path=tmp_path/'demo.png', full_page=True)
            # on a phone (390 px wide) the page fits: nothing is cut off on the right
            phone_context = browser.new_context(viewport={'width': 390, 'height': 844})
            phone_context.add_cookies(context.cookies())  # the same visitor, on a phone: its jobs
            phone = open_page(phone_context, url)
            expect(phone.locator('#jobs article').first).to_be_visible()
            width = phone.evaluate('document.documentElement.scrollWidth')
            phone.screenshot(path=tmp_path/'demo-390.png', full_page=True)
            assert width <= 390, f"the page is {width} px wide on a 390 px screen"
            phone_context.close()

            # Ctrl+C with the page connected: the page says it lost the server
            stop_app(app)
            expect(page.locator('#offline')).to_be_visible()
            # started again on the same store, the page reconnects by itself and the jobs are still there
            app = start_app(cwd, port, data)
            expect(page.locator('#offline')).to_be_hidden(timeout=30_000)
            kept = page.locator('#jobs article', has_text='one two three four')
            expect(kept.locator('pre.result')).to_have_text(words)
            expect(page.locator('#jobs article',
                                has_text='hello browser').locator('pre.result')).to_have_text('HELLO BROWSER')
            deadline = time.monotonic() + 10  # the panel is redrawn by the new app's first events
            while not set(workers(page, 'pid')).isdisjoint(first_pids) and time.monotonic() < deadline:
                page.wait_for_timeout(100)
            assert set(workers(page, 'pid')).isdisjoint(first_pids)
            page.get_by_role('button', name='Clear finished').click()
            expect(page.locator('#jobs')).to_have_text('No jobs yet: pick a plugin and submit one.')
            stop_app(app)
            browser.close()
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    outside = [u for u in requests if urlsplit(u).scheme != 'data' and urlsplit(u).hostname != '127.0.0.1']
    assert not outside, f"requests that left 127.0.0.1: {outside}"
    paths = {urlsplit(u).path for u in requests}
    assert {'/events', '/cjm-workers/htmx.min.js', '/cjm-workers/htmx-ext-sse.min.js',
            '/cjm-workers/demo.css'} <= paths
    assert os.listdir(cwd) == ['app.log']  # no .sesskey or other litter; the store is in CJM_DEMO_DATA
    check_log(cwd/'app.log', stops=2)

# ----- the command ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_demo_app_command(tmp_path, sig, no_leftover_processes):
    port = free_port()
    app = start_app(tmp_path, port, tmp_path/'data')
    try:
        assert f'http://127.0.0.1:{port}' in (tmp_path/'app.log').read_text()
        page = httpx.get(f'http://127.0.0.1:{port}/', timeout=5)
        assert 'cjm-fasthtml-workers demo' in page.text
        assert not re.search(r'''(src|href)=["']?(https?:)?//''', page.text)  # every script and link is local
        assert httpx.get(f'http://127.0.0.1:{port}/cjm-workers/htmx-ext-sse.min.js',
                         timeout=5).status_code == 200
        pids = worker_pids(app)
        assert len(pids) == 2  # the pool
        # an open event stream
        with httpx.stream('GET', f'http://127.0.0.1:{port}/events', timeout=10) as events:
            first = next(events.iter_lines())
            assert first.startswith('data: ')
            stop_app(app, sig)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    assert all(pid_gone(pid) for pid in pids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['app.log', 'data']  # no .sesskey or other litter
    assert (tmp_path/'data'/'jobs.sqlite').exists()
    check_log(tmp_path/'app.log')

def test_form_errors(tmp_path, no_leftover_processes):
    "What the form refuses comes back as a 400 with the reason, in the notice."
    port = free_port()
    app = start_app(tmp_path, port, tmp_path/'data')
    base = f'http://127.0.0.1:{port}'
    try:
        for data, reason in [({'plugin_id': 'nope'}, "There is no plugin 'nope'."),
                             ({'plugin_id': 'demo-quick', 'text': 'x' * 2001},
                              'The text has 2001 characters; 2000 at most.')]:
            r = httpx.post(f'{base}/jobs', data=data, timeout=5)
            assert (r.status_code == 400
                    and re.search(r'<div [^>]*id="notice"[^>]*>' + re.escape(escape(reason, quote=False)),
                                  r.text)), r.text
        r = httpx.post(f'{base}/jobs/nope/cancel', timeout=5)
        assert r.status_code == 404 and 'There is no job nope.' in r.text
        if not HAS_SPEECH:
            r = httpx.post(f'{base}/jobs', data={'plugin_id': 'demo-speech'}, timeout=5)
            assert r.status_code == 400 and ".[speech]" in r.text
        assert httpx.post(f'{base}/jobs', data={'plugin_id': 'demo-quick', 'text': 'ok'},
                          timeout=5).status_code == 200
        stop_app(app)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()

def job_ids(page:str) -> list: return re.findall(r'<article [^>]*id="job-([0-9a-f]+)"', page)  # newest first

def test_answers_say_what_is_so(tmp_path, no_leftover_processes):
    "A cancel that is done already is no error; a plugin not loaded is said to be; one job is one job."
    port = free_port()
    app = start_app(tmp_path, port, tmp_path/'data')
    # one visitor (its session cookie kept): a page shows that visitor's jobs only
    visitor = httpx.Client(base_url=f'http://127.0.0.1:{port}', timeout=5)
    try:
        assert '0 jobs waiting' in visitor.get('/').text
        r = visitor.post('/plugins/demo-fail/unload')
        assert (r.status_code == 200
                and 'Failing was not loaded: there was nothing to unload.' in r.text), r.text
        # two run (30 s of streaming each, cancelled below), one waits
        for _ in range(3): visitor.post('/jobs', data={'plugin_id': 'demo-stream', 'text': 'w ' * 200})
        deadline = time.monotonic() + 20
        while '1 job waiting' not in (page := visitor.get('/').text):  # until both have started
            assert time.monotonic() < deadline, re.findall(r'\d+ jobs? waiting', page)
            time.sleep(0.1)
        running = job_ids(page)[-1]
        for _ in range(2):  # a double click: the second finds it cancelled, which is what was asked
            r = visitor.post(f'/jobs/{running}/cancel')
            assert r.status_code == 200 and 'class="notice' not in r.text, r.text
        stop_app(app)
    finally:
        visitor.close()
        kill_tree(app)

def test_interrupted_job_shows_no_run_time(tmp_path, no_leftover_processes):
    "A job the app's end cut short says so, and not a run time that counts the time the app was down."
    port, data = free_port(), tmp_path/'data'
    app = start_app(tmp_path, port, data)
    visitor = httpx.Client(base_url=f'http://127.0.0.1:{port}', timeout=5)  # keeps its session cookie
    try:
        visitor.post('/jobs', data={'plugin_id': 'demo-slow', 'text': 'cut short'})
        deadline = time.monotonic() + 20
        while 'badge running' not in visitor.get('/').text: assert time.monotonic() < deadline
        kill_tree(app)  # SIGKILL, its workers too: the job is left running in the store
        time.sleep(1.5)  # down for a while
        app = start_app(tmp_path, port, data)
        # the same cookie still names the visitor: the key that signs it was kept in the data folder
        assert stat.S_IMODE((data/'session.key').stat().st_mode) == 0o600
        card = re.search(r'<article [^>]*>.*?</article>', visitor.get('/').text, re.S).group(0)
        assert 'interrupted by an app restart' in card and 'interrupted when the app stopped' in card, card
        assert not re.search(r'ran \d|ended \d', card), card
        stop_app(app)
    finally:
        visitor.close()
        kill_tree(app)

def test_queue_full_is_said(tmp_path, no_leftover_processes):
    "A visitor with 200 jobs waiting is asked to wait: a 429 with Retry-After, in the notice; others are not."
    port = free_port()
    app = start_app(tmp_path, port, tmp_path/'data')
    base = f'http://127.0.0.1:{port}'
    visitor, other = httpx.Client(base_url=base, timeout=10), httpx.Client(base_url=base, timeout=10)
    try:
        # 2 run (30 s of streaming each: longer than the posts take on a slow machine), 200 wait
        job = {'plugin_id': 'demo-stream', 'text': 'w ' * 200}
        codes = [visitor.post('/jobs', data=job).status_code for _ in range(202)]
        assert codes == [200] * 202, codes
        r = visitor.post('/jobs', data=job)
        assert r.status_code == 429 and int(r.headers['Retry-After']) >= 1, r.headers
        assert re.search(r'<div [^>]*id="notice"[^>]*>[^<]*try again in about \d+ s', r.text), r.text
        assert other.post('/jobs', data=job).status_code == 200  # the limit is per visitor
        stop_app(app)
    finally:
        visitor.close()
        other.close()
        kill_tree(app)

def load_demo_app():
    "demo_app.py as a module: it builds the app; its manager is made by the lifespan only."
    spec = importlib.util.spec_from_file_location('demo_app_under_test', ROOT/'demo_app.py')
    demo_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_app)
    return demo_app

def test_data_dir_is_private(tmp_path, monkeypatch, no_leftover_processes):
    "The job store's folder: per user, made 0700; one another user owns, or may write to, is refused."
    demo_app = load_demo_app()
    monkeypatch.delenv('CJM_DEMO_DATA', raising=False)
    monkeypatch.delenv('XDG_DATA_HOME', raising=False)
    monkeypatch.setenv('HOME', str(tmp_path/'home'))
    data = demo_app.data_dir()
    assert (data == tmp_path/'home/.local/share/cjm-fasthtml-workers-demo'
            and stat.S_IMODE(data.stat().st_mode) == 0o700)
    monkeypatch.setenv('XDG_DATA_HOME', str(tmp_path/'xdg'))
    assert demo_app.data_dir() == tmp_path/'xdg/cjm-fasthtml-workers-demo'
    # made first by someone else, in a folder both may write to (as the shared temporary folder is)
    planted = tmp_path/'planted'
    planted.mkdir(mode=0o700)
    monkeypatch.setenv('CJM_DEMO_DATA', str(planted))
    if os.getuid() == 0: os.chown(planted, 65534, 65534)  # nobody's
    else: monkeypatch.setattr(os, 'getuid', lambda: os.stat(planted).st_uid + 1)
    with pytest.raises(demo_app.DataDirError, match='belongs to another user'): demo_app.data_dir()
    monkeypatch.undo()
    shared = tmp_path/'shared'
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv('CJM_DEMO_DATA', str(shared))
    with pytest.raises(demo_app.DataDirError, match='chmod 700'): demo_app.data_dir()
    # the command says it and stops, before it serves anything
    run = subprocess.run([sys.executable, str(ROOT/'demo_app.py'), str(free_port())], capture_output=True,
                         text=True,
                         env={**os.environ, 'CJM_DEMO_DATA': str(shared)}, timeout=60)
    assert run.returncode == 1 and 'chmod 700' in run.stderr and 'Traceback' not in run.stderr, run.stderr

def test_workers_panel_rows():
    ("What the manager says of its workers: another visitor's job by no id; "
     "idle time and GPU memory when given.")
    from types import SimpleNamespace
    from fasthtml.common import to_xml
    demo_app = load_demo_app()
    row = dict(worker_id=0, pid=11, state='busy', gpu=None, loaded_plugin='slow', current_job_id='a' * 32,
               last_exit=None, jobs_done=1, restart_count=0, crashes=0, cancels=0)
    mine = {'b' * 32}
    demo_app.manager = SimpleNamespace(get_worker_info=lambda: {'pending_jobs': 3},
                                       get_job=lambda i, owner: i in mine or None)
    def panel(rows): return re.sub(r'>\s+<', '><', to_xml(demo_app.WorkersPanel(rows, 'me')))
    html = panel([row, {**row, 'worker_id': 1, 'current_job_id': 'b' * 32}])
    assert "<td>another visitor's job</td>" in html and 'a' * 32 not in html and 'b' * 32 in html, html
    assert 'idle for' not in html and 'GPU memory' not in html and '3 jobs waiting' in html
    # a manager that says how long a plugin has been idle and what each worker holds on its GPU
    html = panel([{**row, 'idle_seconds': 42.4, 'gpu_memory_mb': 1536},
                  {**row, 'idle_seconds': None, 'gpu_memory_mb': None}])
    assert (re.search(r'idle for</th><td>42 s</td><td>–', html)
            and re.search(r'GPU memory</th><td>1,536 MiB</td>', html))
    parts = [to_xml(demo_app.QueueNote('j', p, eta))
             for p, eta in [(0, 0.2), (1, 4.6), (2, None), (10, 30), (None, 1)]]
    assert [re.sub(r'<[^>]+>', '', p).strip() for p in parts] == [
        'waiting: next in line, about 1 s', 'waiting: 2nd in line, about 5 s', 'waiting: 3rd in line',
        'waiting: 11th in line, about 30 s', ''], parts

# ----- the GPU rows, with a fake NVML (this machine may have no GPU) ----------------------------------------
def test_resources_panel_shows_gpus():
    from fasthtml.common import to_xml
    from cjm_fasthtml_workers.extensions.resources import FakeNVML, ResourceManager
    demo_app = load_demo_app()
    assert demo_app.manager is None
    # pid 4321 is not the app's
    gpu = FakeNVML.gpu(80 << 30, {4321: 3 << 30}, name='Fake H100', utilization=7)
    demo_app.resources = ResourceManager(nvml=FakeNVML([gpu]))
    html = to_xml(demo_app.ResourcesPanel(demo_app.read_resources(), []))
    for text in ['GPU 0', 'Fake H100', '3.0 GiB of 80.0 GiB', '7 %',
                 'free: processes outside the app use 3.8%', 'app server']:
        assert text in html, text
    assert 'No GPU' not in html
    demo_app.resources = ResourceManager(nvml=FakeNVML(init_error='Driver Not Loaded'))
    html = to_xml(demo_app.ResourcesPanel(demo_app.read_resources(), []))
    assert 'No GPU: NVML could not be initialised: Driver Not Loaded' in html
