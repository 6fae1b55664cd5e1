"""The per-job overhead rows of issue 22, for two checkouts of the library in one run: before and after a change.

    python benchmarks/compare.py OLD_CHECKOUT NEW_CHECKOUT          # 5 rounds; about 2 minutes
    python benchmarks/compare.py /work/wt-base . --reps 7 --quick   # --quick: small sizes

Each round runs one fresh process per checkout, the two taking turns going first; every process measures its own
floors (the mp.Queue echo, `ProcessPoolExecutor(1)`) beside the library, so each ratio is taken within one process.
The table gives the median (min–max) over rounds. The shapes are those of benchmarks/library.py; the library
measured is the checkout's (it goes first on sys.path), the benchmark code is this one's."""
import argparse, asyncio, json, os, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
FULL = dict(latency=1000, throughput=3000, burst=3000, events=100_000)
QUICK = dict(latency=200, throughput=500, burst=500, events=10_000)
ROWS = [  # (key, title, unit, target text)
    ('latency_ratio', 'awaited latency ÷ mp.Queue echo', '×', '≤ 1.5'),
    ('latency_us', 'awaited latency, median', 'µs', ''),
    ('throughput', 'throughput, all submitted then awaited', 'jobs/s', ''),
    ('throughput_ppe', 'throughput ÷ ProcessPoolExecutor(1)', '×', '≥ 1.5'),
    ('stall_ms', 'event-loop stall while those jobs are submitted', 'ms', '≤ 5'),
    ('cold_ratio', 'cold start (start() to the first result) ÷ the floor\'s', '×', '≤ 1.2'),
    ('burst_ms', f"loop held by a burst of start_job from one coroutine", 'ms', '≤ 30'),
    ('events', 'events delivered per second (streaming job, counting broadcaster)', 'events/s', '≥ 100,000'),
    ('chunks', 'chunks delivered per second (the same; joined chunks counted one by one)', 'chunks/s', ''),
]

def probe(sizes:dict) -> dict:
    "In a fresh process whose sys.path starts with the checkout: every row once."
    import floor, library, suite
    async def main():
        out, msg = {}, suite.request()
        m, q, ppe = library.make(), floor.QueueFloor(), floor.pool_executor()
        try:
            await m.start()
            await library.round_trips(m, 100); floor.round_trips(q, 100, msg); await floor.pool_round_trips(ppe, 50, msg)
            lib = statistics.median(await library.round_trips(m, sizes['latency']))
            base = statistics.median(floor.round_trips(q, sizes['latency'], msg))
            out.update(latency_us=lib * 1e6, latency_ratio=lib / base)
            rate, stall = await library.throughput(m, sizes['throughput'])
            out['stall_ms'] = stall * 1e3
            ppe_rate = await floor.pool_throughput(ppe, sizes['throughput'], msg)
            out.update(throughput=rate, throughput_ppe=rate / ppe_rate)
            await library.burst(m, 200)
            out['burst_ms'] = (await library.burst(m, sizes['burst']))[0] * 1e3
        finally:
            m.shutdown(); q.stop(); ppe.shutdown()
        colds = [(await library.cold_start())[0] for _ in range(3)]
        floors = [floor.cold_start(msg) for _ in range(3)]
        for _, f in floors: f.stop()
        out['cold_ratio'] = statistics.median(colds) / statistics.median(c for c, _ in floors)
        try: out['events'], out['chunks'], out['coalesced'] = await library.event_rate(sizes['events'])
        except RuntimeError: out['events'] = out['chunks'] = float('nan')  # a checkout that drops chunks
        return out
    return asyncio.run(main())

def run_probe(checkout:str, quick:bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(checkout), HERE]))
    cmd = [sys.executable, os.path.abspath(__file__), '--probe'] + (['--quick'] if quick else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode: raise RuntimeError(f"probe of {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('checkouts', nargs='*', help='the checkouts to compare (the first is the baseline)')
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--probe', action='store_true', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.probe:
        import logging
        logging.getLogger('cjm_fasthtml_workers').setLevel(logging.ERROR)
        print(json.dumps(probe(sizes)))
        return 0
    runs = {c: [] for c in args.checkouts}
    for i in range(args.reps):
        order = args.checkouts if i % 2 == 0 else args.checkouts[::-1]
        for c in order:
            t0 = time.perf_counter()
            runs[c].append(run_probe(c, args.quick))
            print(f"round {i + 1}/{args.reps} {c}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    def cell(xs):
        med = statistics.median(xs)
        f = (lambda x: f'{x:,.0f}') if med >= 100 else (lambda x: f'{x:.2f}')
        return f'{f(med)} ({f(min(xs))}–{f(max(xs))})'
    print('| row | unit | target | ' + ' | '.join(args.checkouts) + ' |')
    print('| --- ' * (3 + len(args.checkouts)) + '|')
    for key, title, unit, target in ROWS:
        print(f'| {title} | {unit} | {target} | ' + ' | '.join(cell([r[key] for r in runs[c]]) for c in runs) + ' |')
    print(f"\nsizes {sizes}; median (min–max) of {args.reps} rounds, each checkout in a fresh process per round, "
          f"taking turns going first; load average {os.getloadavg()[0]:.2f} at the end")
    return 0

if __name__ == '__main__':
    sys.exit(main())
