"""The shapes of issues 6 and 10, their repetitions, table and JSON; `python benchmarks/run.py` runs it.

Each repetition measures every shape for the library (library.py) and for the floor (floor.py): a spawned echo
worker over two `multiprocessing.Queue`s and over one `multiprocessing.Pipe`, and `ProcessPoolExecutor(1)`
beside them. The two sides take turns going first, and each ratio (library ÷ floor, or ÷ the executor
where the row says so; a pool's speed-up, time(N=1) ÷ time(N)) is taken within one repetition before the
median over repetitions is reported with its min–max: on a shared, noisy machine the ratios of one run are
what counts, never an absolute time."""
import argparse, asyncio, json, logging, multiprocessing, os, platform, statistics, subprocess, sys, time
import uuid
from dataclasses import dataclass, field

import psutil
import floor, library

HERE = os.path.dirname(os.path.abspath(__file__))

# ----- the table's rows -------------------------------------------------------------------------------------
@dataclass
class Shape:
    "A row of the table."
    id: str  # key in the JSON
    title: str
    unit: str
    floor: str  # what the floor column measures
    target: tuple = ()  # ('ratio' or 'abs', '<=' or '>=', bound); () when the row is only reported
    ratio: bool = True  # whether library ÷ base means something here
    base: str = 'floor'  # the column the ratio divides by: 'floor', or 'ppe' for ProcessPoolExecutor(1)

BASES = {'floor': 'floor', 'ppe': 'PPE(1)'}  # a ratio's base as the table names it
IDLE_LOOP = 'an idle event loop, same ticker'
PPE = ('ProcessPoolExecutor(1, spawn): echo(msg) awaited through asyncio.wrap_future, '
       'all submitted, then all awaited')
SHAPES = [
    Shape('latency_median', 'sequential latency, median', 'µs', 'mp.Queue echo round trip',
          ('ratio', '<=', 1.5)),
    Shape('latency_p99', 'sequential latency, p99', 'µs', 'mp.Queue echo round trip'),
    Shape('throughput', 'throughput', 'jobs/s', 'pipelined mp.Queue echo, 64 in flight',
          ('ratio', '>=', 0.25)),
    Shape('throughput_ppe', 'throughput vs ProcessPoolExecutor(1)', 'jobs/s', PPE, ('ratio', '>=', 1.5),
          base='ppe'),
    Shape('stall_submissions', 'event-loop stall: submissions', 'ms', IDLE_LOOP, ('abs', '<=', 5),
          ratio=False),
    Shape('stall_burst', 'event-loop hold: a burst of start_job from one coroutine (3,000 jobs)', 'ms',
          'none: the hold itself', ('abs', '<=', 30), ratio=False),
    Shape('event_rate', 'events delivered per second: a 100,000-chunk stream, a broadcaster that only counts',
          'events/s', 'none: the rate itself', ('abs', '>=', 100_000), ratio=False),
    Shape('stall_cancel', 'event-loop stall: cancel', 'ms', IDLE_LOOP, ('abs', '<=', 5), ratio=False),
    Shape('stall_reload', 'event-loop stall: reload', 'ms', IDLE_LOOP, ('abs', '<=', 5), ratio=False),
    Shape('stall_unload', 'event-loop stall: unload', 'ms', IDLE_LOOP, ('abs', '<=', 5), ratio=False),
    Shape('cold_start', 'cold start', 'ms', 'spawn the mp.Queue echo worker to its first echo',
          ('ratio', '<=', 1.2)),
    Shape('cancel_to_ready', 'cancel to ready', 'ms', 'the cold start of the floor', ('ratio', '<=', 1.2)),
    Shape('crash_detection', 'crash detection', 'ms', "SIGKILL to the worker's sentinel ready",
          ('abs', '<=', 10)),
    Shape('shutdown_idle', 'shutdown, idle manager', 'ms', 'None to the echo worker, then join',
          ('abs', '<=', 50)),
    Shape('payload_1mb', 'payload 1 MB', 'ms', 'mp.Queue echo of the same text', ('ratio', '<=', 1.1)),
    Shape('payload_10mb', 'payload 10 MB', 'ms', 'mp.Queue echo of the same text', ('ratio', '<=', 1.1)),
    Shape('payload_200mb', 'payload 200 MB of bytes, there and back', 'ms',
          'mp.Queue echo of the same bytes'),
    Shape('stall_payload_200mb', 'event-loop stall: 200 MB of bytes there and back', 'ms', IDLE_LOOP,
          ('abs', '<=', 5), ratio=False),
    Shape('memory_kept', 'memory, jobs kept', 'B/job', 'RSS growth per mp.Queue echo', ratio=False),
    Shape('memory_cleared', 'memory, jobs cleared', 'B/job', 'RSS growth per mp.Queue echo', ratio=False),
    Shape('pool_start', 'pool start, N=4', 'ms', '4 cold starts of the floor in a row', ('ratio', '<=', 1.2)),
    Shape('pool_job_n1', 'pool N=1, per 50 ms sleep job', 'ms', 'none: the sleep itself is 50 ms',
          ratio=False),
    Shape('pool_speedup_2', 'pool speed-up N=2', '×',
          'none: the library against itself, time(N=1) ÷ time(N)', ('abs', '>=', 1.9), ratio=False),
    Shape('pool_speedup_4', 'pool speed-up N=4', '×',
          'none: the library against itself, time(N=1) ÷ time(N)', ('abs', '>=', 3.5), ratio=False),
    Shape('affinity_loads', 'model loads, 2 plugins alternating x100 on 2 workers', 'loads',
          'the same jobs on 1 worker (echo and sleep plugins, two submitted then both awaited)',
          ('abs', '<=', 2), ratio=False),
    Shape('affinity_loads_at_once', 'model loads, the same, all 100 submitted at once', 'loads',
          'none: the affinity row, all jobs submitted before any is awaited', ratio=False),
]

# How much of each shape one repetition does: the sizes, and a quick run's
FULL = dict(reps=5, latency=2000, throughput=5000, payload_1mb=10, payload_10mb=4, payload_200mb=2, cancel=3,
            commands=5, cold=3, crash=5, memory=10000, idle=0.3, pool_jobs=40, affinity=100, burst=3000,
            events=100_000)
QUICK = dict(reps=2, latency=200, throughput=500, payload_1mb=2, payload_10mb=1, payload_200mb=1, cancel=1,
             commands=1, cold=1, crash=1, memory=1000, idle=0.1, pool_jobs=8, affinity=100, burst=500,
             events=10_000)
SLEEP = 0.05  # seconds each job of the pool shapes sleeps
MB = 1_000_000

def request(text:str='x') -> dict:
    "A floor message shaped like the library's EXECUTE request, so that both sides pickle the same."
    return {'type': 'execute', 'job_id': uuid.uuid4().hex, 'plugin_name': 'echo', 'text': text}

def p99(xs:list) -> float: return sorted(xs)[max(0, round(0.99 * len(xs)) - 1)]
def median(xs) -> float: return statistics.median(list(xs))

def in_fresh_process(target, *args):
    "Run `target(*args, conn)` in a spawned process and return what it sends on `conn`."
    ctx = multiprocessing.get_context('spawn')
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, sender), name='benchmark-probe')
    proc.start()
    sender.close()
    try: return receiver.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"{target.__module__}.{target.__name__} failed with exit code "
                           f"{proc.exitcode}") from None
    finally:
        proc.join()
        receiver.close()

# ----- one repetition: a pair of functions per group of shapes, the library's and the floor's ---------------
@dataclass
class Rig:
    ("What one repetition measures with, and what it found: "
     "{shape id: {'library'|'floor'|'pipe'|'ppe': value}}.")
    sizes: dict
    manager: library.TextJobManager = field(default_factory=library.make)
    crashing: library.TextJobManager = field(
        default_factory=lambda: library.make('always', max_restart_attempts=10**6))
    floors: tuple = field(
        default_factory=lambda: (('floor', floor.QueueFloor()), ('pipe', floor.PipeFloor())))
    ppe: object = field(default_factory=floor.pool_executor)  # its worker is spawned at the first submission
    msg: dict = field(default_factory=request)
    out: dict = field(default_factory=lambda: {s.id: {} for s in SHAPES})

    def put(self, side:str, **values):
        for k, v in values.items(): self.out[k][side] = v

    async def warm(self):
        await asyncio.gather(self.manager.start(), self.crashing.start())
        await library.round_trips(self.manager, 50)
        for _, f in self.floors: floor.round_trips(f, 50, self.msg)
        await floor.pool_round_trips(self.ppe, 50, self.msg)

    def close(self):
        self.manager.shutdown()
        self.crashing.shutdown()
        for _, f in self.floors: f.stop()
        self.ppe.shutdown()

# RSS is measured in a fresh process: in this one, memory that earlier shapes freed would hide the growth
async def library_memory(r:Rig):
    cleared, kept = in_fresh_process(library.memory_probe, r.sizes['memory'])
    r.put('library', memory_cleared=cleared, memory_kept=kept)
async def floor_memory(r:Rig):
    grown = in_fresh_process(floor.memory_probe, r.sizes['memory'], r.msg)
    r.put('floor', memory_cleared=grown, memory_kept=grown)

async def library_latency(r:Rig):
    t = await library.round_trips(r.manager, r.sizes['latency'])
    r.put('library', latency_median=median(t) * 1e6, latency_p99=p99(t) * 1e6)
async def floor_latency(r:Rig):
    for side, f in r.floors:
        t = floor.round_trips(f, r.sizes['latency'], r.msg)
        r.put(side, latency_median=median(t) * 1e6, latency_p99=p99(t) * 1e6)
    t = await floor.pool_round_trips(r.ppe, r.sizes['latency'], r.msg)
    r.put('ppe', latency_median=median(t) * 1e6, latency_p99=p99(t) * 1e6)

async def library_throughput(r:Rig):
    rate, stall = await library.throughput(r.manager, r.sizes['throughput'])
    r.put('library', throughput=rate, throughput_ppe=rate, stall_submissions=stall * 1e3)
async def floor_throughput(r:Rig):
    for side, f in r.floors: r.put(side, throughput=floor.pipelined(f, r.sizes['throughput'], r.msg))
    rate = await floor.pool_throughput(r.ppe, r.sizes['throughput'], r.msg)
    r.put('ppe', throughput=rate, throughput_ppe=rate)
    idle = await library.idle_stall(r.sizes['idle']) * 1e3
    r.put('floor', stall_submissions=idle, stall_cancel=idle, stall_reload=idle, stall_unload=idle)

async def library_overhead(r:Rig):  # issue 22's rows: the loop's hold in a burst; issue 18's event rate
    await library.burst(r.manager, 200)
    stall, _ = await library.burst(r.manager, r.sizes['burst'])
    rate, _, _ = await library.event_rate(r.sizes['events'])
    r.put('library', stall_burst=stall * 1e3, event_rate=rate)

async def library_payload(r:Rig):
    for key, size in (('payload_1mb', MB), ('payload_10mb', 10 * MB)):
        r.put('library',
              **{key: median(await library.round_trips(r.manager, r.sizes[key], 'x' * size)) * 1e3})
    trips = [await library.bytes_round_trip(r.manager, 200 * MB) for _ in range(r.sizes['payload_200mb'])]
    r.put('library', payload_200mb=median(t for t, _ in trips) * 1e3,
          stall_payload_200mb=max(s for _, s in trips) * 1e3)
async def floor_payload(r:Rig):
    for key, size in (('payload_1mb', MB), ('payload_10mb', 10 * MB)):
        for side, f in r.floors:
            r.put(side, **{key: median(floor.round_trips(f, r.sizes[key], request('x' * size))) * 1e3})
    blob = request(b'x' * (200 * MB))
    for side, f in r.floors:
        r.put(side, payload_200mb=median(floor.round_trips(f, r.sizes['payload_200mb'], blob)) * 1e3)
    r.put('floor', stall_payload_200mb=await library.idle_stall(r.sizes['idle']) * 1e3)

async def library_commands(r:Rig):  # the floor of a cancel is the floor's cold start
    cancels = [await library.cancel_to_ready(r.manager) for _ in range(r.sizes['cancel'])]
    stalls = {c: [await library.command_stall(r.manager, c) for _ in range(r.sizes['commands'])]
              for c in ('reload', 'unload')}
    r.put('library', cancel_to_ready=median(t for t, _ in cancels) * 1e3,
          stall_cancel=max(s for _, s in cancels) * 1e3,
          stall_reload=max(stalls['reload']) * 1e3, stall_unload=max(stalls['unload']) * 1e3)

async def library_lifecycle(r:Rig):
    runs = [await library.cold_start() for _ in range(r.sizes['cold'])]
    r.put('library', cold_start=median(c for c, _ in runs) * 1e3,
          shutdown_idle=median(s for _, s in runs) * 1e3)
async def floor_lifecycle(r:Rig):
    runs = []
    for _ in range(r.sizes['cold']):
        cold, f = floor.cold_start(r.msg)
        runs.append((cold, floor.stop_time(f)))
    cold = median(c for c, _ in runs) * 1e3
    r.put('floor', cold_start=cold, cancel_to_ready=cold, shutdown_idle=median(s for _, s in runs) * 1e3)

async def library_crash(r:Rig):
    r.put('library', crash_detection=median(
        [await library.crash_detection(r.crashing) for _ in range(r.sizes['crash'])]) * 1e3)
async def floor_crash(r:Rig):
    r.put('floor', crash_detection=median(floor.cold_start(r.msg)[1].kill()
                                          for _ in range(r.sizes['crash'])) * 1e3)

# The pool's N=1 is the rig's warm manager; N=4 is the manager whose start is measured, so that it starts once
async def library_pool(r:Rig):
    start, big = await library.pool_start(4)
    pools = {1: r.manager, 2: library.make(max_workers=2), 4: big}
    try:
        for n, m in pools.items():  # every worker runs one job first: the sleep plugin is loaded everywhere
            await m.start()
            await library.sleeps(m, n, SLEEP)
        wall = {n: await library.sleeps(m, r.sizes['pool_jobs'], SLEEP) for n, m in pools.items()}
    finally:
        for n in (2, 4): pools[n].shutdown()
    r.put('library', pool_start=start * 1e3, pool_job_n1=wall[1] / r.sizes['pool_jobs'] * 1e3,
          pool_speedup_2=wall[1] / wall[2], pool_speedup_4=wall[1] / wall[4])
async def floor_pool(r:Rig):
    r.put('floor', pool_start=floor.cold_starts(4, r.msg) * 1e3)

async def library_affinity(r:Rig):
    r.put('library', affinity_loads=await library.model_loads(2, r.sizes['affinity']),
          affinity_loads_at_once=await library.model_loads(2, r.sizes['affinity'], pairs=False))
async def floor_affinity(r:Rig):
    r.put('floor', affinity_loads=await library.model_loads(1, r.sizes['affinity']))

GROUPS = [(library_memory, floor_memory), (library_latency, floor_latency),
          (library_throughput, floor_throughput), (library_overhead, None), (library_payload, floor_payload),
          (library_commands, None),
          (library_lifecycle, floor_lifecycle),
          (library_crash, floor_crash), (library_pool, floor_pool), (library_affinity, floor_affinity)]

async def repetition(sizes:dict, rep:int) -> dict: # {shape id: {'library'|'floor'|'pipe'|'ppe': value}}
    "Every shape once, in the table's units; in each group the library goes first in even repetitions."
    rig = Rig(sizes)
    try:
        await rig.warm()
        for pair in GROUPS:
            for side in (pair if rep % 2 == 0 else pair[::-1]):
                if side is not None: await side(rig)
    finally: rig.close()
    return rig.out

# ----- summary ----------------------------------------------------------------------------------------------
def stats(xs:list) -> dict:
    return {'median': statistics.median(xs), 'min': min(xs), 'max': max(xs), 'reps': xs}

def verdict(shape:Shape, row:dict) -> tuple: # (True, False, or None when only reported; the table's text)
    if not shape.target: return None, 'reported'
    kind, op, bound = shape.target
    value = row['ratio']['median'] if kind == 'ratio' else row['library']['median']
    met = value <= bound if op == '<=' else value >= bound
    off = value / bound if op == '<=' else bound / value
    return met, 'yes' if met else f'no, by {off:.2f}×'

def target_text(shape:Shape) -> str:
    if not shape.target: return 'reported'
    kind, op, bound = shape.target
    unit = shape.unit if shape.unit == '×' else ' ' + shape.unit
    return (f"{'≤' if op == '<=' else '≥'} "
            + (f'{bound:g}× {BASES[shape.base]}' if kind == 'ratio' else f'{bound:g}{unit}'))

def summarize(reps:list) -> dict: # {shape id: row}, each row as it goes in the JSON
    rows = {}
    for s in SHAPES:
        row = {'title': s.title, 'unit': s.unit, 'floor_is': s.floor, 'target': target_text(s)}
        for side in ('library', 'floor', 'pipe', 'ppe'):
            if xs := [r[s.id][side] for r in reps if side in r[s.id]]: row[side] = stats(xs)
        if s.ratio:  # pair by pair: a noisy moment hits both sides of one repetition alike
            row['ratio'] = stats([r[s.id]['library'] / r[s.id][s.base] for r in reps])
        row['met'], row['verdict'] = verdict(s, row)
        rows[s.id] = row
    return rows

def num(x:float) -> str:
    if abs(x) >= 100 or float(x).is_integer(): return f'{x:,.0f}'
    return f'{x:.1f}' if abs(x) >= 10 else f'{x:.2f}'

def cell(st:dict, suffix:str='') -> str:
    if st is None: return '-'
    if st['min'] == st['max']: return num(st['median']) + suffix
    return f"{num(st['median'])}{suffix} ({num(st['min'])}–{num(st['max'])})"

def table(rows:dict) -> str:
    head = ('shape', 'unit', 'library', 'floor', 'ratio', 'mp.Pipe floor', 'PPE(1)', 'target', 'met')
    body = [(r['title'], r['unit'], cell(r['library']), cell(r.get('floor')), cell(r.get('ratio'), '×'),
             cell(r.get('pipe')), cell(r.get('ppe')), r['target'], r['verdict']) for r in rows.values()]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)

# ----- where it ran -----------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = None
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            cpu = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), None)
    return {'cpu': cpu or platform.processor() or platform.machine(),
            'cores': psutil.cpu_count(logical=False),
            'logical_cpus': os.cpu_count(), 'memory_gib': round(psutil.virtual_memory().total / 2**30, 1),
            'python': f'{platform.python_implementation()} {platform.python_version()}',
            'platform': platform.platform(),
            # a worker without cached bytecode compiles the library at every spawn: cold starts depend on it
            'bytecode_cache': not sys.dont_write_bytecode}

def checkout() -> dict:
    "Which library was measured: its path, version and git state."
    import cjm_fasthtml_workers
    root = os.path.dirname(os.path.dirname(os.path.abspath(cjm_fasthtml_workers.__file__)))
    try: git = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError): git = ''
    return {'path': root, 'version': cjm_fasthtml_workers.__version__, 'git': git or None}

def leftover_children() -> list:
    "Child processes still running, multiprocessing's resource tracker excepted."
    left = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and not any('resource_tracker' in a for a in p.cmdline()):
                left.append(p.pid)
        except psutil.Error: pass
    return left

# ----- main -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description='Benchmarks: what the job manager costs on top of the raw multiprocessing floor.')
    ap.add_argument('--quick', action='store_true',
                    help='small sizes and 2 repetitions: a check that the script works')
    ap.add_argument('--reps', type=int, help='repetitions (default: 5, or 2 with --quick)')
    ap.add_argument('--json', default=os.path.join(HERE, 'results.json'), help='where to write the results')
    args = ap.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    if args.reps: sizes['reps'] = args.reps
    # the crash shape kills workers: warnings expected
    logging.getLogger('cjm_fasthtml_workers').setLevel(logging.ERROR)
    info, lib, started, load = machine(), checkout(), time.time(), os.getloadavg()

    async def run_all():
        reps = []
        for i in range(sizes['reps']):
            t0 = time.perf_counter()
            reps.append(await repetition(sizes, i))
            print(f"repetition {i + 1}/{sizes['reps']}: {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        return reps
    rows = summarize(asyncio.run(run_all()))
    info['load_average'] = {'start': load, 'end': os.getloadavg()}
    result = {'machine': info, 'library': lib, 'shapes': rows,
              'missed': [k for k, r in rows.items() if r['met'] is False],
              'run': {'started': time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(started)),
                      'seconds': round(time.time() - started, 1), 'quick': args.quick, 'sizes': sizes}}
    print(table(rows))
    print(f"\nmedian (min–max) over {sizes['reps']} interleaved repetitions; "
          "each ratio is taken within a repetition: "
          "library ÷ floor, or ÷ PPE(1) where the target names it.")
    print(f"PPE(1): {PPE}; the latency rows await one at a time.")
    print(f"pool: {sizes['pool_jobs']} jobs that sleep {SLEEP * 1e3:.0f} ms, submitted then awaited, "
          "for N = 1, 2, 4; the speed-up is time(N=1) ÷ time(N).")
    print('the floor of each row:')
    for what in dict.fromkeys(s.floor for s in SHAPES):
        print(f"  {what}: {', '.join(s.title for s in SHAPES if s.floor == what)}")
    print(f"library {lib['version']} ({lib['git'] or 'no git'}) at {lib['path']}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['python']}, {info['platform']}, "
          f"bytecode cache {'on' if info['bytecode_cache'] else 'off'}; "
          f"load average {load[0]:.2f} at the start; {result['run']['seconds']:.0f} s in all")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f: json.dump(result, f, indent=1)
    print(f'written to {args.json}')
    if left := leftover_children():
        print(f'error: child processes left behind: {left}', file=sys.stderr)
        return 1
    return 0
