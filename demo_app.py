"""cjm-fasthtml-workers demo: jobs run in a pool of two supervised worker processes and show up live over
Server-Sent Events, built on `cjm_fasthtml_workers.extensions.fasthtml`.

    python demo_app.py [PORT]    # or PORT=8000 python demo_app.py; serves http://127.0.0.1:5001 by default
    uvicorn demo_app:app         # works too, --reload included

Each browser session is a visitor who owns its jobs: a page shows, cancels and clears its visitor's jobs only.
The job history is kept across restarts in a SQLite job store, `jobs.sqlite` in the folder named by the
environment variable CJM_DEMO_DATA (default: `$XDG_DATA_HOME/cjm-fasthtml-workers-demo`, or
`~/.local/share/...`), a folder of yours only (mode 0700), with `session.key`, which signs the session cookies
(so a visitor's jobs are still theirs after a restart); a job that was running when the app stopped comes back
failed. The speech-recognition plugin needs the `speech` extra (`pip install -e '.[speech]'` from the clone's
root, which brings pocketsphinx); without it the page says so. No internet needed: htmx and its SSE extension
are served from the package."""
import asyncio, json, logging, os, secrets, signal, stat, sys, uuid
from datetime import datetime
from pathlib import Path

import uvicorn
from fasthtml.common import *

from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
from cjm_fasthtml_workers.demo import DemoJob, DemoPluginRegistry, demo_worker_process
from cjm_fasthtml_workers.extensions.fasthtml import (STATIC_PREFIX, SSEBroadcaster, run_workers,
                                                      serve_static,
                                                      queue_full_response, sse_response, workers_page)
from cjm_fasthtml_workers.extensions.resources import ResourceManager
from cjm_fasthtml_workers.managers.base import BaseJobManager, QueueFull
from cjm_fasthtml_workers.managers.store import INTERRUPTED, SQLiteJobStore

log = logging.getLogger('demo_app')
MAX_TEXT = 2000  # characters of job text the form takes

# ----- The job manager: the library as an app uses it -------------------------------------------------------
class DemoJobManager(BaseJobManager[DemoJob]):
    "Runs the demo plugins in a pool of supervised worker processes."
    def create_job(self, plugin_id, text=''): return DemoJob(id=uuid.uuid4().hex, plugin_id=plugin_id,
                                                             text=text)
    # from the package: the spawned worker imports it
    def get_worker_entry_point(self): return demo_worker_process
    # stream=True asks for streaming; the manager streams only plugins whose registry entry supports it
    def prepare_execute_request(self, job): return {'text': job.text, 'stream': True}
    def extract_job_result(self, job, result_data):
        # a streamed job's result is {'streamed': True}: keep its text in the record, so that the store keeps
        # it
        if result_data.get('streamed'):
            return {'text': ''.join(self.get_job_chunks(job.id)), 'streamed': True}
        return result_data
    async def broadcast_event(self, event_type, data):
        # a running job's cancel says whether it stopped (its worker and model stay) or its worker was ended
        if event_type.endswith(':cancelled') and (job := self.get_job(data['job_id'])):
            job.how = data.get('how')
        await super().broadcast_event(event_type, data)

class DataDirError(RuntimeError): "The demo's data folder is not safe to use."

def data_dir() -> Path:
    "The folder of the job store: CJM_DEMO_DATA, else a per-user one; made private (0700) if it is new."
    home = os.environ.get('XDG_DATA_HOME') or Path.home()/'.local'/'share'
    data = Path(os.environ.get('CJM_DEMO_DATA') or Path(home)/'cjm-fasthtml-workers-demo')
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    # the store reads its records back with pickle: a folder another user owns, or may write to, could hold a
    # planted database that runs their code here; refuse it, as ssh refuses such a key
    st = data.stat()
    if st.st_uid != os.getuid():
        raise DataDirError(f"{data} belongs to another user (uid {st.st_uid}): set CJM_DEMO_DATA to a "
                           f"folder of yours")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DataDirError(f"{data} may be written by other users (mode {stat.filemode(st.st_mode)}): chmod "
                           f"700 it")
    return data

class SessionKey:
    """The key that signs session cookies, read from the data folder (made there, 0600, the first time) when
    the app starts, not when the module is imported (spawned workers, tests); kept, a visitor's jobs outlive a
    restart."""
    def __str__(self):
        path = data_dir()/'session.key'
        try: fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError: return path.read_text()
        with os.fdopen(fd, 'w') as f: f.write(key := secrets.token_hex(32))
        return key

def open_manager() -> DemoJobManager:
    ("The manager and its job store, made in the lifespan: spawned workers run this file again; "
     "one process opens a store.")
    data = data_dir()
    return DemoJobManager('demo', registry.category, supports_streaming=True, plugin_registry=registry,
                          resource_manager=resources, event_broadcaster=streams,
                          # the newest 500 finished
                          job_store=SQLiteJobStore(data/'jobs.sqlite', retention=500),
                          # two workers; a crash, or a cancel of a job that does not stop, brings a new one; a
                          # visitor with 200 jobs waiting is asked to wait (QueueFull)
                          worker_config=WorkerConfig(max_workers=2, restart_policy=RestartPolicy.ALWAYS,
                                                     max_pending_per_owner=200))

registry, resources, streams = DemoPluginRegistry(), ResourceManager(), SSEBroadcaster()
manager: DemoJobManager = None  # open_manager()'s, from the lifespan on

async def lifespan(app):
    global manager
    manager = open_manager()
    # the operator's live page at /workers (open here: give it a guard in a real app)
    workers_page(app, manager)
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
    # FastHTML's defaults load htmx and more from a CDN: serve_static serves the package's copies
    default_hdrs=False,
    hdrs=(Meta(charset='utf-8'), Meta(name='viewport', content='width=device-width, initial-scale=1'),
          Meta(name='htmx-config', content=json.dumps(htmx_config)), Link(rel='icon', href='data:,'),
          Link(rel='stylesheet', href=f'{STATIC_PREFIX}/demo.css')),
    secret_key=SessionKey(),  # read as the app starts; a key given writes no .sesskey file
    canonical=False, lifespan=lifespan)
serve_static(app)

# ----- Components -------------------------------------------------------------------------------------------
def clock(iso): return datetime.fromisoformat(iso).strftime('%H:%M:%S') if iso else None
def took(start,
         end): return f"{(datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds():.1f} s"
def gib(n): return f"{n / 2**30:.1f} GiB"
def mib(n): return f"{n / 2**20:.0f} MiB"
def swap(on): return 'true' if on else None  # an out-of-band swap replaces the element with the same id
def plural(n, word): return f"{n} {word}{'' if n == 1 else 's'}"
def ordinal(n): return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
def owner(session): return session.setdefault('owner', uuid.uuid4().hex)  # a browser session: a visitor

def QueueNote(job_id, position, eta, oob=False):
    ("A waiting job's place in the one queue of every visitor's jobs (0: next; "
     "None: leaving it), and its estimate.")
    place = None if position is None else 'next' if position == 0 else ordinal(position + 1)
    about = '' if eta is None else f", about {max(1, round(eta))} s"
    return P(place and f"waiting: {place} in line{about}", id=f'queue-{job_id}', cls='queue',
             hx_swap_oob=swap(oob))

# what a cancel of a running job did (the cancelled event's `how`)
HOW = {'stopped': 'Stopped: its worker and model stay for the next job.',
       'killed': 'Its worker was ended: the plugin did not stop in time.'}

def ProgressBar(job, oob=False):
    ("The part of a card that progress events replace: small, so the card's Cancel button is never replaced "
     "mid-click.")
    pct = round(100 * (job.progress or 0))
    parts = [Progress(value=pct, max=100), Span(f"{pct} %", cls='pct'),
             Span(job.progress_message or '', cls='muted')]
    return Div(*parts if job.progress is not None else [], id=f'progress-{job.id}', cls='progress',
               hx_swap_oob=swap(oob))

def JobCard(job, shown:dict, oob=False):
    "One job, drawn again when its status changes; `shown` notes how many of its chunks the page has."
    plugin, live = registry.get_plugin(job.plugin_id), job.status in ('pending', 'running')
    chunks = manager.get_job_chunks(job.id)
    shown[job.id] = len(chunks)
    text = ''.join(chunks) or (job.result or {}).get('text')
    # a job the app's restart interrupted was marked failed at the next start: its end time is not known
    interrupted = (job.error or '').startswith(INTERRUPTED)
    ended = None if interrupted else job.completed_at
    times = [f"created {clock(job.created_at)}", job.started_at and f"started {clock(job.started_at)}",
             ended and f"ended {clock(ended)}", job.started_at and ended
             and f"ran {took(job.started_at, ended)}",
             interrupted and "interrupted when the app stopped", job.worker_pid
             and f"worker {job.worker_pid}"]
    return Article(
        Header(Span(job.status, cls=f'badge {job.status}'), Strong(plugin.title if plugin else job.plugin_id),
               Code(job.id[:8], title=job.id, cls='muted'),  # enough to tell two apart; the whole id on hover
               # disabled while its request is out: a double click sends one
               Button('Cancel', hx_post=f'/jobs/{job.id}/cancel', hx_disabled_elt='this', cls='small quiet')
               if live else None),
        P(job.text, cls='input') if job.text else P('(no text)', cls='input muted'),  # strings are escaped
        QueueNote(job.id, manager.queue_position(job.id), manager.estimated_wait(job.id))
        if job.status == 'pending' else None,
        ProgressBar(job) if live or job.progress is not None else None,
        # chunk events append to the live output; an ended job shows its result, or what it streamed before it
        # ended
        Pre(text or '', id=f'output-{job.id}', cls='output') if live and plugin
        and plugin.supports_streaming else
        Pre(text if text is not None else json.dumps(job.result), cls='result') if job.result else
        Pre(text, cls='output') if text else None,
        P(HOW[job.how], cls='how') if job.status == 'cancelled' and job.how in HOW else None,
        P(job.error, cls='error') if job.error else None,
        Details(Summary('Traceback'), Pre(job.traceback, cls='traceback')) if job.traceback else None,
        Footer(' · '.join(t for t in times if t)),
        id=f'job-{job.id}', cls=job.status, hx_swap_oob=swap(oob))

def JobList(shown:dict, me:str, oob=False):
    # this visitor's, newest first
    cards = [JobCard(job, shown) for job in manager.get_all_jobs(owner=me)[::-1]]
    # the placeholder stays last; CSS hides it while a card is before it
    return Section(*cards, P('No jobs yet: pick a plugin and submit one.', cls='empty muted'),
                   id='jobs', hx_swap_oob=swap(oob))

def Notice(message=None, error=True):
    "Where the answer to a button goes: nothing, what went wrong, or (`error=False`) what there was to know."
    return Div(message, id='notice', role='alert' if error else 'status',
               cls=('notice' if error else 'notice info') if message else None)

def refuse(message, status=400, headers=None):
    return HTMLResponse(to_xml(Notice(message)), status_code=status, headers=headers)

def SubmitForm():
    options = [Option(p.title + (' (not installed)' if p.missing else ''), value=p.id,
                      disabled=bool(p.missing))
               for p in registry.plugins.values()]
    return Form(Select(*options, name='plugin_id', aria_label='Plugin'),
                Input(name='text', value='Hello from the worker process', maxlength=MAX_TEXT,
                      placeholder='Text for the job', aria_label='Text'),
                Button('Submit job'),
                Button('Clear finished', hx_post='/jobs/clear', cls='quiet', type='button'),
                hx_post='/jobs', id='submit')

def WorkersPanel(workers:list, me:str, oob=False):
    "One column per worker of the pool (a slot, whose process a restart replaces): `get_workers_info`'s rows."
    def row(field, name, show=lambda v: '–' if v is None else v, known=False):
        if not any(field in w for w in workers): return None  # what this version of the manager does not say
        if known and all(w.get(field) is None for w in workers): return None  # e.g. GPU memory, with no GPU
        return Tr(Th(name), *[Td(show(w.get(field))) for w in workers], data_field=field)
    def group(title): return Tr(Th(title, colspan=len(workers) + 1, cls='group'))
    # another visitor's job is shown by no id
    def job(i): return i if i is None or manager.get_job(i, owner=me) else "another visitor's job"
    return Section(H2('Workers'),
                   Table(Tr(Th(), *[Th(f"worker {w['worker_id']}") for w in workers]),
                         row('pid', 'pid'), row('state', 'state'), row('loaded_plugin', 'loaded plugin'),
                         row('idle_seconds', 'idle for', lambda v: '–' if v is None else f"{v:.0f} s",
                             known=True),
                         row('current_job_id', 'running job', job), row('gpu', 'GPU', known=True),
                         row('gpu_memory_mb', 'GPU memory', lambda v: '–' if v is None else f"{v:,} MiB",
                             known=True),
                         row('last_exit', 'last exit'),
                         # the slot's counts, whichever of its processes did the work
                         group('since the app started'), row('jobs_done', 'jobs done'),
                         row('restart_count', 'restarts'), row('crashes', 'of which crashes'),
                         row('cancels', 'of which cancels')),
                   P(plural(manager.get_worker_info()['pending_jobs'], 'job') + ' waiting', cls='muted',
                     id='waiting'),
                   id='workers', hx_swap_oob=swap(oob))

def PluginRow(p):
    # a command waits for the job its worker runs: while the request is out, htmx marks the row (which shows
    # .waiting) and disables its buttons
    buttons = Div(Button('Reload', hx_post=f'/plugins/{p.id}/reload', cls='small',
                         title='Load its next configuration'),
                  Button('Unload', hx_post=f'/plugins/{p.id}/unload', cls='small quiet'),
                  Span('waiting for its workers (a running job ends first)…', cls='waiting'),
                  hx_indicator=f'#plugin-{p.id}', hx_disabled_elt=f'#plugin-{p.id} button', cls='actions')
    sample =(Audio(src=f'{STATIC_PREFIX}/speech-sample.wav', controls=True, preload='none')
             if p.name == 'speech' else None)
    return Tr(Td(Strong(p.title), Br(), Small(p.description), sample,
                 P('Not installed: ', Code(p.missing), cls='missing') if p.missing else None),
              Td(Code(json.dumps(registry.load_plugin_config(p.id))), None if p.missing else buttons),
              id=f'plugin-{p.id}')

def PluginsPanel(note=None, oob=False):
    rows = map(PluginRow, registry.plugins.values())
    return Section(H2('Plugins'), Table(Tr(Th('plugin'), Th('configuration')), *rows),
                   P(note, cls='note') if note else None, id='plugins', hx_swap_oob=swap(oob))

def read_resources() -> dict:
    "GPUs, system memory and the app's processes (with their memory): NVML and psutil calls, for a thread."
    return {'gpu': resources.check_gpu_availability(), 'memory': resources.check_memory_availability()}

def GpuRows(gpu):
    "One GPU from `ResourceManager.check_gpu_availability`: memory, use, who uses it, whether a job could."
    d, app = gpu.details, [f"{r['pid']} ({gib(r['gpu_memory'] or 0)})" for r in gpu.app_processes]
    return Table(Tr(Th(f"GPU {gpu.device_index}"), Td(d['name'])),
                 Tr(Th('memory'), Td(Progress(value=d['memory_used'], max=d['memory_total']),
                                     f" {gib(d['memory_used'])} of {gib(d['memory_total'])}")),
                 Tr(Th('utilization'),
                    Td('–' if d['utilization_gpu'] is None else f"{d['utilization_gpu']} %")),
                 Tr(Th('app processes'), Td(', '.join(app) or 'none')),
                 Tr(Th('other processes'), Td(len(gpu.external_pids))),
                 Tr(Th('status'), Td(gpu.message.split(': ', 1)[-1])))

def Processes(reading:dict, workers:list, oob=False):
    ("The app's processes and their memory (from `reading`); who is a worker, and in what state, "
     "from `workers`.")
    # drawn with the workers panel from the same rows, so the two agree: a worker that has ended since the
    # reading is not listed, one that started since is listed with its memory to come
    by_pid = {w['pid']: w for w in workers if w['pid']}
    def row(pid, worker_pid, memory):
        if worker_pid is None: return Tr(Td(pid), Td('app server'), Td(memory))
        w = by_pid[worker_pid]
        if pid != worker_pid: return Tr(Td(pid), Td(f"child of worker {w['worker_id']}"), Td(memory))
        loaded = f", {w['loaded_plugin']} loaded" if w['loaded_plugin'] else ''
        return Tr(Td(pid), Td(f"worker {w['worker_id']}: {w['state']}{loaded}"), Td(memory), cls='worker')
    procs = [r for r in reading['memory'].app_processes if r['worker_pid'] is None
             or r['worker_pid'] in by_pid]
    new = [pid for pid in by_pid if pid not in {r['pid'] for r in procs}]
    return Table(Tr(Th('pid'), Th("app's processes"), Th('memory')),
                 *[row(r['pid'], r['worker_pid'], mib(r['memory_rss'])) for r in procs],
                 *[row(pid, pid, '–') for pid in new], id='processes', hx_swap_oob=swap(oob))

def ResourcesPanel(reading:dict, workers:list, oob=False):
    gpu, mem = reading['gpu'], reading['memory']
    used, total, percent = mem.details['used'], mem.details['total'], mem.details['used_percent']
    no_gpu = P(f"No GPU: {gpu.details.get('gpu_unavailable_reason')}", cls='muted')
    return Section(H2('Resources'), *[GpuRows(a) for a in gpu.devices] or [no_gpu],
                   Table(Tr(Th('system memory'), Td(Progress(value=round(percent), max=100), Span(
                       f" {gib(used)} of {gib(total)} ({percent:.0f} %)", cls='nowrap')))),
                   Processes(reading, workers),
                   P(f"read at {datetime.now():%H:%M:%S}", cls='muted', id='read-at'),
                   id='resources', hx_swap_oob=swap(oob))

latest: dict = None  # the last reading, which the processes table is drawn from until the next
read_now = asyncio.Event()  # a worker has ended or started: read the resources without waiting for the tick

async def read_latest() -> dict:
    "Read the resources (off the event loop) and keep the reading for the processes table."
    global latest
    latest = await asyncio.to_thread(read_resources)
    return latest

def WorkerPanels(me:str, reading:dict=None, oob=False):
    "The workers panel and the resources (or, between readings, their processes) from one `get_workers_info`."
    workers = manager.get_workers_info()
    return WorkersPanel(workers, me, oob), (ResourcesPanel(reading, workers, oob) if reading else
                                       Processes(latest, workers, oob) if latest else None)

async def send_resources(every:float=2.0):
    ("While a page is open, read the resources every 2 s (or when a worker changed), once for all pages, "
     "and send them.")
    while True:
        try: await asyncio.wait_for(read_now.wait(), every)
        except asyncio.TimeoutError: pass
        read_now.clear()
        if not streams.clients: continue
        try: await streams.broadcast('demo:resources', await read_latest())
        except Exception: log.exception("reading the resources failed")

def Changes(event, shown:dict, me:str):
    "What an event changes on visitor `me`'s page, as out-of-band swaps of the smallest parts that changed."
    # the stream brings no other visitor's job
    job = manager.get_job(event.data.get('job_id') or '', owner=me)
    # and the workers: a worker that has become ready says nothing of it
    if event.kind == 'resources': return WorkerPanels(me, event.data, oob=True)
    if event.kind == 'plugins':
        return PluginsPanel(event.data.get('note'), oob=True), WorkerPanels(me, oob=True)
    if event.kind == 'cleared':
        return tuple(Div(id=f'job-{i}', hx_swap_oob='delete') for i in event.data['ids'])
    if event.kind == 'queued':  # a waiting job's place changed
        return QueueNote(job.id, event.data['position'], event.data['eta_seconds'], oob=True) if job else None
    if job is None:  # a worker died or was restarted: its new process's memory is read at once
        read_now.set()
        return WorkerPanels(me, oob=True)
    if event.kind == 'progress': return ProgressBar(job, oob=True)
    if event.kind == 'chunk':
        # the text this page has not got: chunks the card already showed are not sent again, a lost event
        # costs none
        chunks, had = manager.get_job_chunks(job.id), shown.get(job.id, 0)
        shown[job.id] = len(chunks)
        if len(chunks) == had: return None
        return Span(''.join(chunks[had:]), hx_swap_oob=f'beforeend:#output-{job.id}')
    if event.kind == 'submitted':  # one card more, at the top: the list is not drawn again
        return Div(JobCard(job, shown), hx_swap_oob='afterbegin:#jobs'), WorkerPanels(me, oob=True)
    return JobCard(job, shown, oob=True), WorkerPanels(me, oob=True)

# ----- Routes -----------------------------------------------------------------------------------------------
@app.get('/')
async def index(session):
    me = owner(session)
    workers_panel, resources_panel = WorkerPanels(me, await read_latest())
    return Titled('cjm-fasthtml-workers demo',
        P('Jobs run in a pool of two supervised worker processes; everything below updates live over '
          'Server-Sent Events. ', A('The workers page', href='/workers'), ' shows what each one does.',
          cls='lead'),
        Div('The connection to the server is lost; reconnecting…', id='offline', role='status', hidden=True),
        # every button's answer goes inside #answer: the notice, empty or not; a box that stays, so that two
        # requests out at once both land in it (an answer that replaced it would leave the other's target
        # detached)
        Div(Div(SubmitForm(), Div(Notice(), id='answer'), JobList({}, me)),
            Div(workers_panel, PluginsPanel(), resources_panel),
            cls='grid', hx_target='#answer', hx_swap='innerHTML'),
        # one event stream for the page: each message swaps in, out of band, the parts that changed
        Div(id='live', hx_ext='sse', sse_connect='/events', sse_swap='message', hx_swap='none'),
        Script(src=f'{STATIC_PREFIX}/demo.js'))

@app.post('/jobs')
async def submit(session, plugin_id:str='', text:str=''):
    plugin = registry.get_plugin(plugin_id)
    if plugin is None: return refuse(f"There is no plugin {plugin_id!r}.")
    if plugin.missing: return refuse(f"{plugin.title} is not installed: {plugin.missing}")
    if len(text) > MAX_TEXT: return refuse(f"The text has {len(text)} characters; {MAX_TEXT} at most.")
    # the visitor's job: its card comes to the visitor's pages with its submitted event
    try: await manager.options(owner=owner(session)).start_job(plugin_id, text=text)
    except ValueError as e: return refuse(str(e))
    except QueueFull as e:  # the visitor has 200 jobs waiting: 429, with when to try again
        return refuse(str(e), 429, {'Retry-After': queue_full_response(None, e).headers['Retry-After']})
    return Notice()

@app.post('/jobs/clear')
async def clear(session):
    me = owner(session)
    ended = [j.id for j in manager.get_all_jobs(owner=me) if j.status in ('completed', 'failed', 'cancelled')]
    manager.clear_completed_jobs(owner=me)
    # the event names its owner: it goes to this visitor's pages only
    await streams.broadcast('demo:cleared',
                            {'ids': [i for i in ended if manager.get_job(i) is None], 'owner': me})
    return Notice()

@app.post('/jobs/{job_id}/cancel')
async def cancel(session, job_id:str):
    # the card changes through the job's cancelled event; another visitor's job is no job here
    me = owner(session)
    if await manager.cancel_job(job_id, owner=me): return Notice()
    job = manager.get_job(job_id, owner=me)
    if job is None: return refuse(f"There is no job {job_id}.", 404)
    if job.status == 'cancelled': return Notice()  # a second click, or another page's: what was asked is done
    return refuse(f"Job {job_id} has {job.status} already; there is nothing to cancel.")

@app.post('/plugins/{plugin_id}/{action}')
async def plugin_action(plugin_id:str, action:str):
    plugin = registry.get_plugin(plugin_id)
    if plugin is None or action not in ('reload', 'unload'):
        return refuse(f"There is no plugin {plugin_id!r} to {action}.")
    if action == 'reload':
        config = registry.next_config(plugin_id)
        ok = await manager.reload_plugin(plugin.name, config)
        note =(f"{plugin.title}: reloaded with {json.dumps(config)}."
               if ok else f"{plugin.title}: reloading failed.")
    else:
        if not any(w['loaded_plugin'] == plugin.name for w in manager.get_workers_info()):
            return Notice(f"{plugin.title} was not loaded: there was nothing to unload.", error=False)
        ok = await manager.unload_plugin(plugin.name)
        note = f"{plugin.title}: unloaded." if ok else f"{plugin.title}: unloading failed."
    await streams.broadcast('demo:plugins', {'note': note})  # every page shows the change and the note
    return Notice() if ok else refuse(note)

@app.get('/events')
def events(session):
    shown, me = {}, owner(session)  # this page's: job id -> how many of its chunks it has; its visitor
    async def everything():  # a page that connects, or reconnects, is caught up first
        return (JobList(shown, me, oob=True), PluginsPanel(oob=True),
                WorkerPanels(me, await read_latest(), oob=True))
    # owner=me: the visitor's own job events, and worker events without another visitor's job
    return sse_response(streams, lambda event: Changes(event, shown, me), first=everything, owner=me)

# ----- Serve ------------------------------------------------------------------------------------------------
if __name__ == '__main__':
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get('PORT', 5001))
    # said here, before the server starts, if it is unsafe
    try: print(f"job store in {data_dir()}", flush=True)
    except DataDirError as e: sys.exit(f"cjm-fasthtml-workers demo: {e}")
    # a backstop for responses that do not end
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning',
                                           timeout_graceful_shutdown=3))
    print(f"cjm-fasthtml-workers demo: http://127.0.0.1:{port}  (Ctrl+C to stop)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM ends the app as Ctrl+C does
    try: server.run()
    except KeyboardInterrupt: pass  # uvicorn raises again the signal it has handled
    finally:
        # already done by the lifespan, unless a second Ctrl+C skipped it
        if manager is not None: manager.shutdown()
    print("demo stopped", flush=True)
