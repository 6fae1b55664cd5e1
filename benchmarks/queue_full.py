"""Benchmark of admission (issue 20): how long `start_job` takes to refuse a job with `QueueFull` when 10,000 jobs
wait, against an accepted `start_job` measured in the same run, on the same manager, with the same 10,000 waiting.

    python benchmarks/queue_full.py               # 10,000 waiting, 5 repetitions: about half a minute
    python benchmarks/queue_full.py --quick       # 1,000 waiting, 2 repetitions: keeps the script working
    python benchmarks/queue_full.py --reps 9 --json /tmp/queue_full.json

Each repetition starts a manager of benchmarks/library.py (one worker, the package's scenario plugins), keeps its
worker busy with a `hang` job, and queues `waiting` echo jobs from 100 owners. Then, in turn (the order alternates
between repetitions), it times `samples` calls of each shape, one call at a time:

- accepted: `options(owner=...).start_job('echo')` with no limit set: the job is made, pickled and queued;
- refused, total: the same call with `max_pending_jobs` equal to the jobs waiting: `QueueFull`;
- refused, per owner: an owner with 100 jobs waiting, `max_pending_per_owner=100`: `QueueFull`.

The table shows each shape's median (and p99) time per call, over all repetitions' calls, and the ratio of the
medians to the accepted call's within each repetition (median, min-max over repetitions). Target: a refusal is
answered in under 10 ms at 10,000 waiting."""
import argparse, asyncio, json, os, platform, statistics, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):  # this checkout's library, and benchmarks/library.py
    if path not in sys.path: sys.path.insert(0, path)

FULL = dict(reps=5, waiting=10_000, owners=100, samples=500)
QUICK = dict(reps=2, waiting=1_000, owners=100, samples=50)
SHAPES = {'accepted': 'accepted start_job (the baseline)', 'refused_total': 'QueueFull, max_pending_jobs',
          'refused_owner': 'QueueFull, max_pending_per_owner'}
TARGET_MS = 10.0

def median(xs) -> float: return statistics.median(list(xs))
def p99(xs) -> float: xs = sorted(xs); return xs[min(len(xs) - 1, int(0.99 * len(xs)))]

async def timed(call, n:int, refused:bool) -> list: # seconds per call
    "Time `n` calls of `call()`, one at a time; each must be refused (QueueFull) or accepted, as `refused` says."
    from cjm_fasthtml_workers.managers.base import QueueFull
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        try: await call()
        except QueueFull:
            out.append(time.perf_counter() - t0)
            if not refused: raise
            continue
        out.append(time.perf_counter() - t0)
        if refused: raise RuntimeError("a call that should have been refused was accepted")
    return out

async def repetition(sizes:dict, i:int) -> dict: # shape -> [seconds per call]
    import library
    m = library.make()
    cfg, per_owner = m.worker_config, sizes['waiting'] // sizes['owners']
    try:
        await m.start()
        hang = await m.start_job('hang')
        while hang.status != 'running': await asyncio.sleep(0.005)
        for k in range(sizes['waiting']): await m.options(owner=f'o{k % sizes["owners"]}').start_job('echo', text='x')
        if len(m._book.unstarted) != sizes['waiting']: raise RuntimeError(f"{len(m._book.unstarted)} jobs wait")

        async def accepted():
            cfg.max_pending_jobs = cfg.max_pending_per_owner = None
            out = await timed(lambda: m.options(owner='new').start_job('echo', text='x'), sizes['samples'], False)
            for job in m.get_all_jobs(owner='new'): await m.cancel_job(job.id)  # back to `waiting` jobs
            return out
        async def refused_total():
            cfg.max_pending_jobs, cfg.max_pending_per_owner = len(m._book.unstarted), None
            return await timed(lambda: m.options(owner='new').start_job('echo', text='x'), sizes['samples'], True)
        async def refused_owner():
            cfg.max_pending_jobs, cfg.max_pending_per_owner = None, per_owner
            return await timed(lambda: m.options(owner='o0').start_job('echo', text='x'), sizes['samples'], True)
        shapes = {'accepted': accepted, 'refused_total': refused_total, 'refused_owner': refused_owner}
        order = list(shapes) if i % 2 == 0 else list(reversed(shapes))
        return {s: await shapes[s]() for s in order}
    finally: await asyncio.to_thread(m.shutdown)

def summarize(reps:list) -> dict:
    rows = {}
    for sid, title in SHAPES.items():
        calls = [x * 1e3 for r in reps for x in r[sid]]
        ratios = [median(r[sid]) / median(r['accepted']) for r in reps]
        rows[sid] = {'title': title, 'median_ms': median(calls), 'p99_ms': p99(calls),
                     'ratio': {'median': median(ratios), 'min': min(ratios), 'max': max(ratios)}}
        if sid != 'accepted':
            rows[sid]['target'] = f'< {TARGET_MS:g} ms'
            rows[sid]['met'] = rows[sid]['median_ms'] < TARGET_MS
    return rows

def table(rows:dict, sizes:dict) -> str:
    head = ('shape', 'waiting', 'median', 'p99', 'vs accepted', 'target', 'met')
    body = [(r['title'], f"{sizes['waiting']:,}", f"{r['median_ms']:.3f} ms", f"{r['p99_ms']:.3f} ms",
             f"{r['ratio']['median']:.3f}x ({r['ratio']['min']:.3f}-{r['ratio']['max']:.3f})",
             r.get('target', 'baseline'), {True: 'yes', False: 'NO', None: '-'}[r.get('met')])
            for r in rows.values()]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)

def main(argv=None) -> int:
    import logging
    ap = argparse.ArgumentParser(description='Benchmark of QueueFull: a refusal at a full queue vs an accepted job.')
    ap.add_argument('--quick', action='store_true', help='1,000 waiting and 2 repetitions: a check that it works')
    ap.add_argument('--reps', type=int, help='repetitions (default: 5, or 2 with --quick)')
    ap.add_argument('--json', help='also write the results to this file')
    args = ap.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    if args.reps: sizes['reps'] = args.reps
    logging.getLogger('cjm_fasthtml_workers').setLevel(logging.ERROR)
    started, load = time.time(), os.getloadavg()
    reps = []
    for i in range(sizes['reps']):
        t0 = time.perf_counter()
        reps.append(asyncio.run(repetition(sizes, i)))
        print(f"repetition {i + 1}/{sizes['reps']}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    rows = summarize(reps)
    print(table(rows, sizes))
    print(f"\nper call, one at a time, {sizes['samples']} calls of each shape in each of {sizes['reps']} repetitions "
          f"(median and p99 over all calls); 'vs accepted': ratio of medians within a repetition, median (min-max).")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, Python "
          f"{platform.python_version()}; load average {load[0]:.2f} at the start; {time.time() - started:.0f} s in all")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'shapes': rows, 'sizes': sizes, 'load_average': load, 'python': platform.python_version(),
                       'seconds': round(time.time() - started, 1)}, f, indent=1)
    return 0

if __name__ == '__main__':
    sys.exit(main())
