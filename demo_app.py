"""cjm-fasthtml-workers demo: jobs run in a supervised worker process and show up live over Server-Sent Events.

    python demo_app.py [PORT]    # or PORT=8000 python demo_app.py; serves http://127.0.0.1:5001 by default

No internet needed: htmx and its SSE extension are served from the package's static folder."""
import asyncio, json, logging, os, secrets, signal, sys, uuid
from dataclasses import dataclass
from datetime import datetime

import uvicorn
from fasthtml.common import *

from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
from cjm_fasthtml_workers.demo import STATIC_DIR, DemoPluginRegistry, demo_worker_process
from cjm_fasthtml_workers.extensions.resources import ResourceManager
from cjm_fasthtml_workers.managers.base import BaseJob, BaseJobManager

# Spawning the worker runs this file again in the worker (as `__mp_main__`, to find `__main__`'s names). So the
# module level only builds objects: the worker starts in `lifespan`, the server under `if __name__ == '__main__'`.

# ----- The job manager: the library as an app uses it --------------------------------------------------------------
@dataclass
class DemoJob(BaseJob):
    text: str = ''    # What the user typed
    output: str = ''  # Text streamed so far (appended from the manager's chunk events)

class DemoJobManager(BaseJobManager[DemoJob]):
    "Runs the demo plugins, one job at a time, in a supervised worker process."
    def create_job(self, plugin_id, text=''): return DemoJob(id=uuid.uuid4().hex[:8], plugin_id=plugin_id, text=text)
    def get_worker_entry_point(self): return demo_worker_process  # from the package: the spawned worker imports it
    # stream=True asks for streaming; the manager streams only plugins whose registry entry supports it
    def prepare_execute_request(self, job): return {'text': job.text, 'stream': True}
    def extract_job_result(self, job, result_data): return result_data

class EventStreams:
    "The manager's event broadcaster: hands every event to each open /events stream."
    def __init__(self): self.queues, self.closed, self.loop = set(), False, None

    async def broadcast(self, event_type, data):
        if event_type == 'demo:chunk' and (job := manager.get_job(data['job_id'])): job.output += data['chunk']
        for q in self.queues: q.put_nowait((event_type, data))

    def close(self):
        "End the open streams and refuse new ones: uvicorn waits for open responses before it shuts down."
        self.closed = True
        for q in self.queues: q.put_nowait(None)

registry, resources, streams = DemoPluginRegistry(), ResourceManager(), EventStreams()
manager = DemoJobManager('demo', registry.category, supports_streaming=True, plugin_registry=registry,
                         resource_manager=resources, event_broadcaster=streams,
                         worker_config=WorkerConfig(restart_policy=RestartPolicy.ALWAYS))  # a crash brings a new worker

async def lifespan(app):
    streams.loop = asyncio.get_running_loop()
    await manager.start()  # spawn the worker now, so the first job does not wait for it
    yield
    streams.close()
    await asyncio.to_thread(manager.shutdown)  # stop the worker (gracefully, then by force) off the event loop
    resources.close()

app = FastHTML(
    default_hdrs=False,  # FastHTML's defaults load htmx and more from a CDN: this app serves its own copies
    hdrs=(Meta(charset='utf-8'), Meta(name='viewport', content='width=device-width, initial-scale=1'),
          Link(rel='icon', href='data:,'), Link(rel='stylesheet', href='/static/demo.css'),
          Script(src='/static/htmx.min.js'), Script(src='/static/htmx-ext-sse.min.js')),
    secret_key=secrets.token_hex(16),  # no sessions to keep across restarts; a key given writes no .sesskey file
    canonical=False, lifespan=lifespan)
app.mount('/static', StaticFiles(directory=STATIC_DIR), name='static')

# ----- Components -------------------------------------------------------------------------------------------------
def clock(iso): return datetime.fromisoformat(iso).strftime('%H:%M:%S') if iso else None
def took(start, end): return f"{(datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds():.1f} s"
def gib(n): return f"{n / 2**30:.1f} GiB"
def mib(n): return f"{n / 2**20:.0f} MiB"
def oob(on): return 'true' if on else None  # an out-of-band swap replaces the element with the same id

def JobCard(job, swap=False):
    "One job; its events replace it whole."
    live, pct = job.status in ('pending', 'running'), round(100 * (job.progress or 0))
    times = [f"created {clock(job.created_at)}", job.started_at and f"started {clock(job.started_at)}",
             job.completed_at and f"ended {clock(job.completed_at)}",
             job.started_at and job.completed_at and f"ran {took(job.started_at, job.completed_at)}",
             job.worker_pid and f"worker {job.worker_pid}"]
    return Article(
        Header(Span(job.status, cls=f'badge {job.status}'), Strong(registry.get_plugin(job.plugin_id).title),
               Code(job.id, cls='muted'),
               Button('Cancel', hx_post=f'/jobs/{job.id}/cancel', hx_swap='none', cls='small quiet') if live else None),
        P(job.text, cls='input') if job.text else P('(no text)', cls='input muted'),  # strings are escaped
        Div(Progress(value=pct, max=100), Span(f"{pct} %", cls='pct'), Span(job.progress_message or '', cls='muted'),
            cls='progress') if job.progress is not None else None,
        # a streamed job's text came as chunks (its result is the documented {'streamed': True})
        Pre(job.output, cls='result' if job.status == 'completed' else 'output') if job.output else
        Pre(job.result.get('text', json.dumps(job.result)), cls='result') if job.result else None,
        P(job.error, cls='error') if job.error else None,
        Footer(' · '.join(t for t in times if t)),
        id=f'job-{job.id}', cls=job.status, hx_swap_oob=oob(swap))

def JobList(swap=False):
    cards = [JobCard(job) for job in manager.get_all_jobs()[::-1]]  # newest first
    return Section(*cards or [P('No jobs yet: pick a plugin and submit one.', cls='muted')], id='jobs', hx_swap_oob=oob(swap))

def SubmitForm():
    return Form(Select(*[Option(p.title, value=p.id) for p in registry.plugins.values()], name='plugin_id', aria_label='Plugin'),
                Input(name='text', value='Hello from the worker process', placeholder='Text for the job', aria_label='Text'),
                Button('Submit job'), Button('Clear finished', hx_post='/jobs/clear', cls='quiet', type='button'),
                hx_post='/jobs', hx_target='#jobs', hx_swap='outerHTML', id='submit')

def Rows(pairs): return Table(*[Tr(Th(k), Td(v)) for k, v in pairs])

def WorkerPanel(swap=False):
    w = manager.get_worker_info()
    return Section(H2('Worker'), Rows([('pid', w['pid'] or '–'), ('state', w['state']), ('restarts', w['restart_count']),
                   ('loaded plugin', w['loaded_plugin'] or 'none'), ('running job', w['current_job_id'] or '–'),
                   ('waiting jobs', w['pending_jobs'])]), id='worker', hx_swap_oob=oob(swap))

def PluginsPanel(note=None, swap=False):
    rows = [Tr(Td(Strong(p.title), Br(), Small(p.description)), Td(Code(json.dumps(registry.load_plugin_config(p.id)))),
               Td(Button('Reload', hx_post=f'/plugins/{p.id}/reload', cls='small', title='Reload with its next configuration'),
                  Button('Unload', hx_post=f'/plugins/{p.id}/unload', cls='small quiet')))
            for p in registry.plugins.values()]
    return Section(H2('Plugins'), Table(Tr(Th('plugin'), Th('configuration'), Th()), *rows), P(note, cls='note') if note else None,
                   id='plugins', hx_target='#plugins', hx_swap='outerHTML', hx_swap_oob=oob(swap))

def GpuRows(gpu):
    "One GPU from `ResourceManager.check_gpu_availability`: memory, use, who uses it, whether a job could."
    d, app = gpu.details, [f"{r['pid']} ({gib(r['gpu_memory'] or 0)})" for r in gpu.app_processes]
    return Rows([(f"GPU {gpu.device_index}", d['name']),
                 ('memory', Div(Progress(value=d['memory_used'], max=d['memory_total']),
                                f" {gib(d['memory_used'])} of {gib(d['memory_total'])}")),
                 ('utilization', '–' if d['utilization_gpu'] is None else f"{d['utilization_gpu']} %"),
                 ('app processes', ', '.join(app) or 'none'), ('other processes', len(gpu.external_pids)),
                 ('status', gpu.message.split(': ', 1)[-1])])

def ResourcesPanel(swap=False):
    "GPUs, system memory and the app's processes (NVML and psutil calls: run it in a thread)."
    gpu, mem = resources.check_gpu_availability(), resources.check_memory_availability()
    gpus = [GpuRows(a) for a in gpu.devices]
    workers = {w.pid: w for w in resources.get_all_workers()}
    def role(r):
        if r['worker_pid'] is None: return 'app server'
        if r['pid'] != r['worker_pid']: return f"child of worker {r['worker_pid']}"
        w = workers.get(r['pid'])
        return 'worker' + (f": {w.status}" if w else '') + (f", {w.plugin_name} loaded" if w and w.plugin_name else '')
    return Section(H2('Resources'),
                   *gpus or [P(f"No GPU: {gpu.details.get('gpu_unavailable_reason')}", cls='muted', id='no-gpu')],
                   Rows([('system memory', Div(Progress(value=round(mem.details['used_percent']), max=100),
                          f" {gib(mem.details['used'])} of {gib(mem.details['total'])} ({mem.details['used_percent']:.0f} %)"))]),
                   Table(Tr(Th('pid'), Th("app's processes"), Th('memory')),
                         *[Tr(Td(r['pid']), Td(role(r)), Td(mib(r['memory_rss']))) for r in mem.app_processes]),
                   id='resources', hx_swap_oob=oob(swap))

def Changes(event_type, data):
    "What an event changed on the page, as out-of-band swaps."
    kind, job = event_type.split(':', 1)[1], manager.get_job(data.get('job_id') or '')
    if kind in ('jobs', 'submitted'): return JobList(True), WorkerPanel(True)  # a job came or went: redraw the list
    if kind == 'plugins': return PluginsPanel(data.get('note'), swap=True), WorkerPanel(True)
    return JobCard(job, True) if job else None, None if kind in ('chunk', 'progress') else WorkerPanel(True)

# ----- Routes -----------------------------------------------------------------------------------------------------
@app.get('/')
async def index():
    return Titled('cjm-fasthtml-workers demo',
        P('Jobs run one at a time in a supervised worker process; everything below updates live over Server-Sent Events.',
          cls='lead'),
        Div(Div(SubmitForm(), JobList()), Div(WorkerPanel(), PluginsPanel(), await asyncio.to_thread(ResourcesPanel)), cls='grid'),
        # one event stream for the page: each message swaps in, out of band, the parts that changed
        hx_ext='sse', sse_connect='/events', sse_swap='message', hx_swap='none')

@app.post('/jobs')
async def submit(plugin_id:str, text:str=''):
    try: await manager.start_job(plugin_id, text=text)  # its 'demo:submitted' event redraws every page's list
    except ValueError as e: return Response(str(e), status_code=400)
    return JobList()

@app.post('/jobs/clear')
async def clear():
    manager.clear_completed_jobs()
    await streams.broadcast('demo:jobs', {})
    return JobList()

@app.post('/jobs/{job_id}/cancel')
async def cancel(job_id:str): await manager.cancel_job(job_id)  # the job's card changes through its event

@app.post('/plugins/{plugin_id}/{action}')
async def plugin_action(plugin_id:str, action:str):
    plugin = registry.get_plugin(plugin_id)
    if plugin is None or action not in ('reload', 'unload'): return Response('Not found', status_code=404)
    if action == 'reload':
        config = registry.next_config(plugin_id)
        ok = await manager.reload_plugin(plugin.name, config)
        note = f"Reloaded {plugin.name} with {json.dumps(config)}." if ok else f"Reloading {plugin.name} failed."
    else:
        ok = await manager.unload_plugin(plugin.name)
        note = f"Unloaded {plugin.name}." if ok else f"Unloading {plugin.name} failed."
    await streams.broadcast('demo:plugins', {'note': note})  # every page shows the change and the note
    return PluginsPanel(note)

async def event_stream():
    "Catch the page up, then send what each event changed; refresh worker and resources every 2 s."
    q = asyncio.Queue()
    streams.queues.add(q)
    try:
        yield sse_message((JobList(True), WorkerPanel(True), PluginsPanel(swap=True), await asyncio.to_thread(ResourcesPanel, True)))
        while not streams.closed:
            try: event = await asyncio.wait_for(q.get(), timeout=2)
            except asyncio.TimeoutError:
                yield sse_message((WorkerPanel(True), await asyncio.to_thread(ResourcesPanel, True)))
                continue
            if event is None: break
            yield sse_message(Changes(*event))
    finally: streams.queues.discard(q)

@app.get('/events')
def events(): return EventStream(event_stream())

# ----- Serve ------------------------------------------------------------------------------------------------------
class Server(uvicorn.Server):
    "uvicorn waits for open responses before it shuts down: end the event streams the moment Ctrl+C comes."
    def handle_exit(self, sig, frame):
        if streams.loop is not None: streams.loop.call_soon_threadsafe(streams.close)
        super().handle_exit(sig, frame)

if __name__ == '__main__':
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get('PORT', 5001))
    server = Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning',
                                   timeout_graceful_shutdown=3))  # a backstop for responses that do not end
    print(f"cjm-fasthtml-workers demo: http://127.0.0.1:{port}  (Ctrl+C to stop)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM ends the app as Ctrl+C does
    try: server.run()
    except KeyboardInterrupt: pass  # uvicorn raises again the signal it has handled
    finally: manager.shutdown()  # already done by lifespan, unless a second Ctrl+C skipped it
    print("demo stopped", flush=True)
