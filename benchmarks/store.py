"""Benchmark of the durable job store (issue 14): a manager with an `SQLiteJobStore` against the same manager
without one, per trivial echo job, in the same run; and a manager reading back a store of 10,000 finished
jobs.

    python benchmarks/store.py               # 5 repetitions: about a minute
    python benchmarks/store.py --quick       # small sizes, 2 repetitions: keeps the script working
    python benchmarks/store.py --reps 9 --json /tmp/store.json --dir /data  # databases on the disk to measure

Each repetition measures both managers (the one without a store first in even repetitions, second in odd
ones); every overhead (with - without) and ratio (with / without) is taken within a repetition, and the table
shows its median (min-max) over the repetitions: on a shared, noisy machine the comparison within one run is
what counts. The managers and their worker are those of benchmarks/library.py (the package's scenario
plugins)."""
import argparse, asyncio, json, os, pickle, platform, sqlite3, statistics, sys, tempfile, time, uuid

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):  # this checkout's library, and benchmarks/library.py
    if path not in sys.path: sys.path.insert(0, path)

# ----- what one repetition does -----------------------------------------------------------------------------
FULL = dict(reps=5, sequential=1000, pipelined=5000, recovery=10_000, stall=2000)
QUICK = dict(reps=2, sequential=100, pipelined=500, recovery=2000, stall=300)
# id: (title, unit, what the "without" column is, target (op, bound) on the overhead or on "with" itself)
SHAPES = {
    'sequential': ('overhead per job, one at a time', 'ms/job', 'the same manager without a store',
                   ('overhead', '<=', 0.2)),
    'pipelined': ('overhead per job, submitted back to back', 'ms/job', 'the same manager without a store',
                  ('overhead', '<=', 0.2)),
    'stall': ('event-loop stall while jobs are submitted', 'ms', 'the same manager without a store', ()),
    'recovery': ('recovering stored finished jobs', 'ms',
                 'SELECT + pickle.loads of the same rows (the floor)', ('with', '<=', 200)),
}

def median(xs) -> float: return statistics.median(list(xs))
def stats(xs) -> dict: xs = list(xs); return {'median': median(xs), 'min': min(xs), 'max': max(xs)}

# ----- shapes -----------------------------------------------------------------------------------------------
async def sequential(m, n:int) -> float: # ms per job
    ("`start_job` then `wait_for_job`, one job at a time: "
     "every state waits for its commit before it is announced.")
    from library import echo
    t0 = time.perf_counter()
    for _ in range(n): await echo(m)
    return (time.perf_counter() - t0) / n * 1e3

async def pipelined(m, n:int) -> tuple: # (ms per job, longest event-loop stall in ms)
    ("`n` jobs submitted back to back, each in its own turn of the loop, then the last awaited; "
     "a 1 ms ticker runs.")
    from library import throughput
    rate, stall = await throughput(m, n)  # it clears the jobs after the ticker stops, as settle() would
    return 1e3 / rate, stall * 1e3

def settle(m):
    ("Clear the finished jobs (from the store too) and wait until the store has done so: "
     "the next sample starts even.")
    m.clear_completed_jobs()
    if m.job_store is not None and not m.job_store.flush(60):
        raise RuntimeError("the job store did not flush")

def prepare_recovery(path:str, n:int):
    "A store of `n` finished jobs, each shaped as the benchmark manager makes and ends them."
    from library import TextJob
    from cjm_fasthtml_workers.managers.store import SQLiteJobStore
    store = SQLiteJobStore(path)
    store.open('bench')
    jobs = [TextJob(id=uuid.uuid4().hex, plugin_id='echo', status='completed',
                    started_at='2026-01-01T00:00:00.000001', completed_at='2026-01-01T00:00:00.000002',
                    result={'text': f'result {i}', 'params': {}},
                    worker_pid=4242, params={'text': f'result {i}'}) for i in range(n)]
    for k in range(0, n, 1000): store.write(jobs[k:k + 1000], lambda: None)
    store.close()

def recover(path:str, n:int) -> float: # ms
    ("Make a manager on the store at `path` and read its jobs: "
     "the store opens and recovers them at that first access.")
    from library import TextJobManager
    from cjm_fasthtml_workers.managers.store import SQLiteJobStore
    t0 = time.perf_counter()
    m = TextJobManager('bench', 'bench', job_store=SQLiteJobStore(path))
    m.get_all_jobs()
    ms = (time.perf_counter() - t0) * 1e3
    try:
        if len(m.jobs) != n or len(m.results) != n: raise RuntimeError(f"recovered {len(m.jobs)} jobs of {n}")
    finally: m.shutdown()
    return ms

def read_floor(path:str, n:int) -> float: # ms
    "The least reading them back can cost: one SELECT of the blobs in submission order, each unpickled."
    t0 = time.perf_counter()
    db = sqlite3.connect(path)
    try: jobs = [pickle.loads(b) for (b,) in db.execute(
        "SELECT blob FROM worker_jobs WHERE namespace = 'bench' ORDER BY seq")]
    finally: db.close()
    ms = (time.perf_counter() - t0) * 1e3
    if len(jobs) != n: raise RuntimeError(f"read {len(jobs)} jobs of {n}")
    return ms

async def repetition(plain, stored, sizes:dict, i:int, recovery_path:str) -> dict:
    ("One repetition: {shape: {'with': x, 'without': y}}; "
     "the side without a store goes first in even repetitions.")
    out = {s: {} for s in SHAPES}
    sides = (('without', plain), ('with', stored)) if i % 2 == 0 else (('with', stored), ('without', plain))
    for side, m in sides:
        out['sequential'][side] = await sequential(m, sizes['sequential'])
        settle(m)
    for side, m in sides:
        out['pipelined'][side], _ = await pipelined(m, sizes['pipelined'])
        settle(m)
    for side, m in sides:
        _, out['stall'][side] = await pipelined(m, sizes['stall'])
        settle(m)
    for side in ('without', 'with') if i % 2 == 0 else ('with', 'without'):
        fn = recover if side == 'with' else read_floor
        out['recovery'][side] = fn(recovery_path, sizes['recovery'])
    return out

# ----- the table --------------------------------------------------------------------------------------------
def summarize(reps:list) -> dict:
    rows = {}
    for sid, (title, unit, base, target) in SHAPES.items():
        row = {'title': title, 'unit': unit, 'without_is': base,
               'with': stats(r[sid]['with'] for r in reps), 'without': stats(r[sid]['without'] for r in reps),
               'overhead': stats(r[sid]['with'] - r[sid]['without'] for r in reps),
               'ratio': stats(r[sid]['with'] / r[sid]['without'] for r in reps if r[sid]['without'] > 0)
                        if all(r[sid]['without'] > 0 for r in reps) else None}
        if target:
            which, op, bound = target
            value = row[which]['median']
            row['target'] = f"{'overhead' if which == 'overhead' else 'with store'} {op} {bound:g} {unit}"
            row['met'] = value <= bound if op == '<=' else value >= bound
        else: row['target'], row['met'] = 'reported', None
        rows[sid] = row
    return rows

def num(x:float) -> str:
    if abs(x) >= 100: return f'{x:,.0f}'
    if abs(x) >= 10: return f'{x:.1f}'
    return f'{x:.2f}' if abs(x) >= 0.1 else f'{x:.3f}'

def cell(st:dict, suffix:str='') -> str:
    if st is None: return '-'
    return f"{num(st['median'])}{suffix} ({num(st['min'])}–{num(st['max'])})"

def table(rows:dict, sizes:dict) -> str:
    head = ('shape', 'size', 'unit', 'with store', 'without', 'overhead', 'ratio', 'target', 'met')
    size = {'sequential': sizes['sequential'], 'pipelined': sizes['pipelined'], 'stall': sizes['stall'],
            'recovery': sizes['recovery']}
    body = [(r['title'], f'{size[sid]:,} jobs', r['unit'], cell(r['with']), cell(r['without']),
             cell(r['overhead']), cell(r['ratio'], '×'), r['target'],
             {True: 'yes', False: 'NO', None: '-'}[r['met']])
            for sid, r in rows.items()]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)

def filesystem(path:str) -> str:
    "The file system type of `path` (from /proc/mounts), for the record: a commit's cost depends on it."
    try:
        best, kind, real = '', '?', os.path.realpath(path)
        with open('/proc/mounts') as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
        return kind
    except OSError: return '?'

# ----- main -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    import logging
    import library
    from cjm_fasthtml_workers.managers.store import SQLiteJobStore
    ap = argparse.ArgumentParser(
        description='Benchmark of the durable job store: a manager with a store vs without.')
    ap.add_argument('--quick', action='store_true',
                    help='small sizes and 2 repetitions: a check that the script works')
    ap.add_argument('--reps', type=int, help='repetitions (default: 5, or 2 with --quick)')
    ap.add_argument('--json', help='also write the results to this file')
    ap.add_argument('--dir', help='where the databases go (default: a new temporary folder)')
    args = ap.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    if args.reps: sizes['reps'] = args.reps
    logging.getLogger('cjm_fasthtml_workers').setLevel(logging.ERROR)
    folder = tempfile.mkdtemp(prefix='cjm-store-bench-', dir=args.dir)
    recovery_path, started = os.path.join(folder, 'recovery.db'), time.time()
    prepare_recovery(recovery_path, sizes['recovery'])
    load = os.getloadavg()

    async def run_all() -> list:
        plain = library.make()
        stored = library.TextJobManager('bench', 'bench',
                                        job_store=SQLiteJobStore(os.path.join(folder, 'jobs.db')))
        try:
            for m in (plain, stored):  # both workers up and warm before anything is timed
                await m.start()
                await sequential(m, 50)
                settle(m)
            reps = []
            for i in range(sizes['reps']):
                t0 = time.perf_counter()
                reps.append(await repetition(plain, stored, sizes, i, recovery_path))
                print(f"repetition {i + 1}/{sizes['reps']}: {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
            return reps
        finally:
            plain.shutdown()
            stored.shutdown()
    try: rows = summarize(asyncio.run(run_all()))
    finally:
        for name in os.listdir(folder): os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
    print(table(rows, sizes))
    print(f"\nmedian (min–max) over {sizes['reps']} interleaved repetitions; "
          "overhead (with − without) and ratio (with ÷ without) are taken within each repetition.")
    print("one at a time: start_job then wait_for_job, so each job waits for three commits "
          "(submitted, started, ended) before it is announced; "
          "back to back: each submission its own turn of the loop, then the last awaited.")
    print(f"recovery: constructing a manager on a store of {sizes['recovery']:,} finished jobs "
          f"(it reads them all back); without: {SHAPES['recovery'][2]}.")
    fs = filesystem(folder)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"Python {platform.python_version()}; databases on {fs} ({os.path.dirname(folder)}); load average "
          f"{load[0]:.2f} at the start; synchronous={SQLiteJobStore.synchronous}; "
          f"{time.time() - started:.0f} s in all")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'shapes': rows, 'sizes': sizes, 'filesystem': fs, 'load_average': load,
                       'python': platform.python_version(), 'seconds': round(time.time() - started, 1)},
                      f, indent=1)
    return 0

if __name__ == '__main__':
    sys.exit(main())
