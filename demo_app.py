"""cjm-fasthtml-workers demo: jobs run in a pool of two supervised worker processes and show up live over Server-Sent
Events, built on `cjm_fasthtml_workers.extensions.fasthtml`.

    python demo_app.py [PORT]    # or PORT=8000 python demo_app.py; serves http://127.0.0.1:5001 by default
    uvicorn demo_app:app         # works too, --reload included

The job history is kept across restarts in a SQLite job store, `jobs.sqlite` in the folder named by the environment
variable CJM_DEMO_DATA (default: `cjm-fasthtml-workers-demo` in the system's temporary folder); a job that was
running when the app stopped comes back failed. The speech-recognition plugin needs the `speech` extra
(`pip install -e '.[speech]'` from the clone's root, which brings pocketsphinx); without it the page says so.
No internet needed: htmx and its SSE extension are served from the package."""
import asyncio, json, logging, os, secrets, signal, sys, tempfile
from datetime import datetime
from pathlib import Path

import uvicorn
from fasthtml.common import *

from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
from cjm_fasthtml_workers.demo import DemoJob, DemoPluginRegistry, demo_worker_process
from cjm_fasthtml_workers.extensions.fasthtml import (STATIC_PREFIX, SSEBroadcaster, run_workers, serve_static,
                                                      sse_response, workers_page)
from cjm_fasthtml_workers.extensions.resources import ResourceManager
from cjm_fasthtml_workers.managers.base import BaseJobManager
from cjm_fasthtml_workers.managers.store import SQLiteJobStore

log = logging.getLogger('demo_app')
MAX_TEXT = 2000  # characters of job text the form takes

# ----- The job manager: the library as an app uses it --------------------------------------------------------------
class DemoJobManager(BaseJobManager[DemoJob]):
    "Runs the demo plugins in a pool of supervised worker processes."
    def create_job(self, plugin_id, text=''): return DemoJob(id=os.urandom(4).hex(), plugin_id=plugin_id, text=text)
    def get_worker_entry_point(self): return demo_worker_process  # from the package: the spawned worker imports it
    # stream=True asks for streaming; the manager streams only plugins whose registry entry supports it
    def prepare_execute_request(self, job): return {'text': job.text, 'stream': True}
    def extract_job_result(self, job, result_data):
        # a streamed job's result is {'streamed': True}: keep its text in the record, so that the store keeps it
        if result_data.get('streamed'): return {'text': ''.join(self.get_job_chunks(job.id)), 'streamed': True}
        return result_data

def open_manager() -> DemoJobManager:
    "The manager and its job store, made in the lifespan: spawned workers run this file again; one process opens a store."
    data = Path(os.environ.get('CJM_DEMO_DATA') or Path(tempfile.gettempdir())/'cjm-fasthtml-workers-demo')
    data.mkdir(parents=True, exist_ok=True)
    return DemoJobManager('demo', registry.category, supports_streaming=True, plugin_registry=registry,
                          resource_manager=resources, event_broadcaster=streams,
                          job_store=SQLiteJobStore(data/'jobs.sqlite', retention=500),  # the newest 500 finished
                          # two workers; a crash or a cancel brings a new one
                          worker_config=WorkerConfig(max_workers=2, restart_policy=RestartPolicy.ALWAYS))

registry, resources, streams = DemoPluginRegistry(), ResourceManager(), SSEBroadcaster()
manager: DemoJobManager = None  # open_manager()'s, from the lifespan on

async def lifespan(app):
    global manager
    manager = open_manager()
    workers_page(app, manager)  # the operator's live page at /workers (open here: give it a guard in a real app)
    async with run_workers(manager, broadcaster=streams):  # the workers start now, and stop with the app
        ticker = asyncio.create_task(send_resources())
        try: yield
        finally: ticker.cancel()
    resources.close()

# htmx leaves a 4xx response unswapped by default: swap it, so that a form's error is shown
htmx_config = {'responseHandling': [{'code': '204', 'swap': False}, {'code': '[23]..', 'swap': True},
                                    {'code': '4..', 'swap': True, 'error': True},
                                    {'code': '...', 'swap': False, 'error': True}]}
app = FastHTML(
    default_hdrs=False,  # FastHTML's defaults load htmx and more from a CDN: serve_static serves the package's copies
    hdrs=(Meta(charset='utf-8'), Meta(name='viewport', content='width=device-width, initial-scale=1'),
          Meta(name='htmx-config', content=json.dumps(htmx_config)), Link(rel='icon', href='data:,'),
          Link(rel='stylesheet', href=f'{STATIC_PREFIX}/demo.css')),
    secret_key=secrets.token_hex(16),  # no sessions to keep across restarts; a key given writes no .sesskey file
    canonical=False, lifespan=lifespan)
serve_static(app)

# ----- Components -------------------------------------------------------------------------------------------------
def clock(iso): return datetime.fromisoformat(iso).strftime('%H:%M:%S') if iso else None
def took(start, end): return f"{(datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds():.1f} s"
def gib(n): return f"{n / 2**30:.1f} GiB"
def mib(n): return f"{n / 2**20:.0f} MiB"
def swap(on): return 'true' if on else None  # an out-of-band swap replaces the element with the same id

def ProgressBar(job, oob=False):
    "The part of a card that progress events replace: small, so the card's Cancel button is never replaced mid-click."
    pct = round(100 * (job.progress or 0))
    parts = [Progress(value=pct, max=100), Span(f"{pct} %", cls='pct'), Span(job.progress_message or '', cls='muted')]
    return Div(*parts if job.progress is not None else [], id=f'progress-{job.id}', cls='progress', hx_swap_oob=swap(oob))

def JobCard(job, shown:dict, oob=False):
    "One job, drawn again when its status changes; `shown` notes how many of its chunks the page has."
    plugin, live = registry.get_plugin(job.plugin_id), job.status in ('pending', 'running')
    chunks = manager.get_job_chunks(job.id)
    shown[job.id] = len(chunks)
    text = ''.join(chunks) or (job.result or {}).get('text')
    times = [f"created {clock(job.created_at)}", job.started_at and f"started {clock(job.started_at)}",
             job.completed_at and f"ended {clock(job.completed_at)}",
             job.started_at and job.completed_at and f"ran {took(job.started_at, job.completed_at)}",
             job.worker_pid and f"worker {job.worker_pid}"]
    return Article(
        Header(Span(job.status, cls=f'badge {job.status}'), Strong(plugin.title if plugin else job.plugin_id),
               Code(job.id, cls='muted'),
               Button('Cancel', hx_post=f'/jobs/{job.id}/cancel', cls='small quiet') if live else None),
        P(job.text, cls='input') if job.text else P('(no text)', cls='input muted'),  # strings are escaped
        ProgressBar(job) if live or job.progress is not None else None,
        # chunk events append to the live output; an ended job shows its result, or what it streamed before it ended
        Pre(text or '', id=f'output-{job.id}', cls='output') if live and plugin and plugin.supports_streaming else
        Pre(text if text is not None else json.dumps(job.result), cls='result') if job.result else
        Pre(text, cls='output') if text else None,
        P(job.error, cls='error') if job.error else None,
        Details(Summary('Traceback'), Pre(job.traceback, cls='traceback')) if job.traceback else None,
        Footer(' · '.join(t for t in times if t)),
        id=f'job-{job.id}', cls=job.status, hx_swap_oob=swap(oob))

def JobList(shown:dict, oob=False):
    cards = [JobCard(job, shown) for job in manager.get_all_jobs()[::-1]]  # newest first
    # the placeholder stays last; CSS hides it while a card is before it
    return Section(*cards, P('No jobs yet: pick a plugin and submit one.', cls='empty muted'),
                   id='jobs', hx_swap_oob=swap(oob))

def Notice(message=None):
    "Where the answer to a button goes: nothing, or what went wrong."
    return Div(message, id='notice', role='alert', cls='notice' if message else None)

def refuse(message): return HTMLResponse(to_xml(Notice(message)), status_code=400)

def SubmitForm():
    options = [Option(p.title + (' (not installed)' if p.missing else ''), value=p.id, disabled=bool(p.missing))
               for p in registry.plugins.values()]
    return Form(Select(*options, name='plugin_id', aria_label='Plugin'),
                Input(name='text', value='Hello from the worker process', maxlength=MAX_TEXT,
                      placeholder='Text for the job', aria_label='Text'),
                Button('Submit job'), Button('Clear finished', hx_post='/jobs/clear', cls='quiet', type='button'),
                hx_post='/jobs', id='submit')

def WorkersPanel(oob=False):
    "One column per worker of the pool: what `get_workers_info` says of it."
    workers = manager.get_workers_info()
    def row(field, name, show=lambda v: '–' if v is None else v):
        return Tr(Th(name), *[Td(show(w[field])) for w in workers], data_field=field)
    return Section(H2('Workers'),
                   Table(Tr(Th(), *[Th(f"worker {w['worker_id']}") for w in workers]),
                         row('pid', 'pid'), row('state', 'state'), row('loaded_plugin', 'loaded plugin'),
                         row('current_job_id', 'running job'), row('gpu', 'GPU'), row('jobs_done', 'jobs done'),
                         row('restart_count', 'restarts'), row('crashes', 'of which crashes'),
                         row('cancels', 'of which cancels'), row('last_exit', 'last exit')),
                   P(f"{manager.get_worker_info()['pending_jobs']} jobs waiting", cls='muted', id='waiting'),
                   id='workers', hx_swap_oob=swap(oob))

def PluginRow(p):
    buttons = Div(Button('Reload', hx_post=f'/plugins/{p.id}/reload', cls='small', title='Load its next configuration'),
                  Button('Unload', hx_post=f'/plugins/{p.id}/unload', cls='small quiet'), cls='actions')
    sample = Audio(src=f'{STATIC_PREFIX}/speech-sample.wav', controls=True, preload='none') if p.name == 'speech' else None
    return Tr(Td(Strong(p.title), Br(), Small(p.description), sample,
                 P('Not installed: ', Code(p.missing), cls='missing') if p.missing else None),
              Td(Code(json.dumps(registry.load_plugin_config(p.id))), None if p.missing else buttons))

def PluginsPanel(note=None, oob=False):
    rows = map(PluginRow, registry.plugins.values())
    return Section(H2('Plugins'), Table(Tr(Th('plugin'), Th('configuration')), *rows),
                   P(note, cls='note') if note else None, id='plugins', hx_swap_oob=swap(oob))

def read_resources() -> dict:
    "GPUs, system memory and the app's processes: NVML and psutil calls, for a thread."
    return {'gpu': resources.check_gpu_availability(), 'memory': resources.check_memory_availability(),
            'workers': {w.pid: w for w in resources.get_all_workers()}}

def GpuRows(gpu):
    "One GPU from `ResourceManager.check_gpu_availability`: memory, use, who uses it, whether a job could."
    d, app = gpu.details, [f"{r['pid']} ({gib(r['gpu_memory'] or 0)})" for r in gpu.app_processes]
    return Table(Tr(Th(f"GPU {gpu.device_index}"), Td(d['name'])),
                 Tr(Th('memory'), Td(Progress(value=d['memory_used'], max=d['memory_total']),
                                     f" {gib(d['memory_used'])} of {gib(d['memory_total'])}")),
                 Tr(Th('utilization'), Td('–' if d['utilization_gpu'] is None else f"{d['utilization_gpu']} %")),
                 Tr(Th('app processes'), Td(', '.join(app) or 'none')),
                 Tr(Th('other processes'), Td(len(gpu.external_pids))),
                 Tr(Th('status'), Td(gpu.message.split(': ', 1)[-1])))

def ResourcesPanel(reading:dict, oob=False):
    gpu, mem, workers = reading['gpu'], reading['memory'], reading['workers']
    def role(r):
        if r['worker_pid'] is None: return 'app server'
        if r['pid'] != r['worker_pid']: return f"child of worker {r['worker_pid']}"
        w = workers.get(r['pid'])
        return 'worker' + (f": {w.status}" if w else '') + (f", {w.plugin_name} loaded" if w and w.plugin_name else '')
    used, total, percent = mem.details['used'], mem.details['total'], mem.details['used_percent']
    no_gpu = P(f"No GPU: {gpu.details.get('gpu_unavailable_reason')}", cls='muted')
    return Section(H2('Resources'), *[GpuRows(a) for a in gpu.devices] or [no_gpu],
                   Table(Tr(Th('system memory'), Td(Progress(value=round(percent), max=100),
                                                   f" {gib(used)} of {gib(total)} ({percent:.0f} %)"))),
                   Table(Tr(Th('pid'), Th("app's processes"), Th('memory')),
                         *[Tr(Td(r['pid']), Td(role(r)), Td(mib(r['memory_rss']))) for r in mem.app_processes]),
                   P(f"read at {datetime.now():%H:%M:%S}", cls='muted', id='read-at'),
                   id='resources', hx_swap_oob=swap(oob))

async def send_resources(every:float=2.0):
    "While a page is open, read the resources every 2 s, once for all pages, and send them (and the workers' state)."
    while True:
        await asyncio.sleep(every)
        if not streams.clients: continue
        try: await streams.broadcast('demo:resources', await asyncio.to_thread(read_resources))
        except Exception: log.exception("reading the resources failed")

def Changes(event, shown:dict):
    "What an event changes on one page, as out-of-band swaps of the smallest parts that changed."
    job = manager.get_job(event.data.get('job_id') or '')
    # and the workers: a worker that has become ready says nothing of it
    if event.kind == 'resources': return ResourcesPanel(event.data, oob=True), WorkersPanel(True)
    if event.kind == 'plugins': return PluginsPanel(event.data.get('note'), oob=True), WorkersPanel(True)
    if event.kind == 'cleared': return tuple(Div(id=f'job-{i}', hx_swap_oob='delete') for i in event.data['ids'])
    if job is None: return WorkersPanel(True)  # a worker died or was restarted
    if event.kind == 'progress': return ProgressBar(job, oob=True)
    if event.kind == 'chunk':
        # the text this page has not got: chunks the card already showed are not sent again, a lost event costs none
        chunks, had = manager.get_job_chunks(job.id), shown.get(job.id, 0)
        shown[job.id] = len(chunks)
        if len(chunks) == had: return None
        return Span(''.join(chunks[had:]), hx_swap_oob=f'beforeend:#output-{job.id}')
    if event.kind == 'submitted':  # one card more, at the top: the list is not drawn again
        return Div(JobCard(job, shown), hx_swap_oob='afterbegin:#jobs'), WorkersPanel(True)
    return JobCard(job, shown, oob=True), WorkersPanel(True)

# ----- Routes -----------------------------------------------------------------------------------------------------
@app.get('/')
async def index():
    reading = await asyncio.to_thread(read_resources)
    return Titled('cjm-fasthtml-workers demo',
        P('Jobs run in a pool of two supervised worker processes; everything below updates live over '
          'Server-Sent Events. ', A('The workers page', href='/workers'), ' shows what each one does.', cls='lead'),
        Div('The connection to the server is lost; reconnecting…', id='offline', role='status', hidden=True),
        # every button's answer goes to the notice: nothing, or the error
        Div(Div(SubmitForm(), Notice(), JobList({})),
            Div(WorkersPanel(), PluginsPanel(), ResourcesPanel(reading)),
            cls='grid', hx_target='#notice', hx_swap='outerHTML'),
        # one event stream for the page: each message swaps in, out of band, the parts that changed
        Div(id='live', hx_ext='sse', sse_connect='/events', sse_swap='message', hx_swap='none'),
        Script(src=f'{STATIC_PREFIX}/demo.js'))

@app.post('/jobs')
async def submit(plugin_id:str='', text:str=''):
    plugin = registry.get_plugin(plugin_id)
    if plugin is None: return refuse(f"There is no plugin {plugin_id!r}.")
    if plugin.missing: return refuse(f"{plugin.title} is not installed: {plugin.missing}")
    if len(text) > MAX_TEXT: return refuse(f"The text has {len(text)} characters; {MAX_TEXT} at most.")
    try: await manager.start_job(plugin_id, text=text)  # its card comes to every page with its submitted event
    except ValueError as e: return refuse(str(e))
    return Notice()

@app.post('/jobs/clear')
async def clear():
    ended = [j.id for j in manager.get_all_jobs() if j.status in ('completed', 'failed', 'cancelled')]
    manager.clear_completed_jobs()
    await streams.broadcast('demo:cleared', {'ids': [i for i in ended if manager.get_job(i) is None]})
    return Notice()

@app.post('/jobs/{job_id}/cancel')
async def cancel(job_id:str):
    # the card changes through the job's cancelled event
    if not await manager.cancel_job(job_id):
        return refuse(f"Job {job_id} has ended already; there is nothing to cancel.")
    return Notice()

@app.post('/plugins/{plugin_id}/{action}')
async def plugin_action(plugin_id:str, action:str):
    plugin = registry.get_plugin(plugin_id)
    if plugin is None or action not in ('reload', 'unload'):
        return refuse(f"There is no plugin {plugin_id!r} to {action}.")
    if action == 'reload':
        config = registry.next_config(plugin_id)
        ok = await manager.reload_plugin(plugin.name, config)
        note = f"Reloaded {plugin.name} with {json.dumps(config)}." if ok else f"Reloading {plugin.name} failed."
    else:
        ok = await manager.unload_plugin(plugin.name)
        note = f"Unloaded {plugin.name}." if ok else f"Unloading {plugin.name} failed."
    await streams.broadcast('demo:plugins', {'note': note})  # every page shows the change and the note
    return Notice() if ok else refuse(note)

@app.get('/events')
def events():
    shown = {}  # this page's: job id -> how many of its chunks it has
    async def everything():  # a page that connects, or reconnects, is caught up first
        reading = await asyncio.to_thread(read_resources)
        return (JobList(shown, oob=True), WorkersPanel(True), PluginsPanel(oob=True),
                ResourcesPanel(reading, oob=True))
    return sse_response(streams, lambda event: Changes(event, shown), first=everything)

# ----- Serve ------------------------------------------------------------------------------------------------------
if __name__ == '__main__':
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get('PORT', 5001))
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning',
                                           timeout_graceful_shutdown=3))  # a backstop for responses that do not end
    print(f"cjm-fasthtml-workers demo: http://127.0.0.1:{port}  (Ctrl+C to stop)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM ends the app as Ctrl+C does
    try: server.run()
    except KeyboardInterrupt: pass  # uvicorn raises again the signal it has handled
    finally:
        if manager is not None: manager.shutdown()  # already done by the lifespan, unless a second Ctrl+C skipped it
    print("demo stopped", flush=True)
