"""The Ray backend's cost (issue 12): an awaited echo via a Ray-backed manager, the local one, and bare Ray.

    python benchmarks/ray_echo.py              # 3 repetitions of 300 awaited echoes and 1000 pipelined ones
    python benchmarks/ray_echo.py --quick      # 2 of 50 and 200: keeps the script working
    python benchmarks/ray_echo.py --json /tmp/ray_echo.json

In one run, on one local Ray instance: bare Ray, `await actor.echo.remote(msg)` of a plain actor (the engine's
floor: one Ray call and its answer); Ray's floor for any relay, a request sent without waiting and its answer
yielded by a streaming generator that runs all along (what the Ray backend does, minus the worker and the
manager); the manager with `backend='ray'` (a host actor relaying to its worker subprocess); and the manager
with the local backend. Latency: one `start_job('echo')` then `wait_for_job` at a time (bare Ray: one awaited
call at a time). Throughput: all submitted, then all awaited. The three take turns going first; each ratio
(Ray-backed manager ÷ bare Ray) is taken within one repetition, then its median over repetitions reported.
Target: the library's overhead over bare Ray, median latency ratio <= 1.5."""
import argparse, asyncio, json, os, queue, statistics, sys, time, uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's library, whatever is installed

import ray
from cjm_fasthtml_workers.core.config import WorkerConfig
from library import TextJobManager

@ray.remote
class Echo:
    "The floor: a plain Ray actor that answers what it is sent."
    def echo(self, msg): return msg

@ray.remote(max_concurrency=4)
class Relay:
    ("The floor of any relay: a request sent without waiting, "
     "its answer yielded by a generator that runs all along.")
    def __init__(self): self.inbox = queue.SimpleQueue()
    def send(self, msg): self.inbox.put(msg)
    def relay(self):
        while True: yield self.inbox.get()

def request(text:str) -> dict:
    "What the floor sends: shaped like the manager's EXECUTE request, so that both sides carry the same."
    return {'type': 'execute', 'job_id': uuid.uuid4().hex, 'plugin_name': 'echo', 'text': text}

def p99(xs:list) -> float: return sorted(xs)[max(0, round(0.99 * len(xs)) - 1)]

# ----- the sides: each an async (latency samples in µs, throughput in echoes/s) ----------------------------
async def bare_ray(actor, n:int, burst:int):
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        await actor.echo.remote(request(f'msg {i}'))
        samples.append((time.perf_counter() - t0) * 1e6)
    t0 = time.perf_counter()
    await asyncio.gather(*[actor.echo.remote(request(f'msg {i}')) for i in range(burst)])
    return samples, burst / (time.perf_counter() - t0)

async def ray_relay(actor, answers, n:int, burst:int):
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        actor.send.remote(request(f'msg {i}'))
        await (await answers.__anext__())
        samples.append((time.perf_counter() - t0) * 1e6)
    t0 = time.perf_counter()
    for i in range(burst): actor.send.remote(request(f'msg {i}'))
    for _ in range(burst): await (await answers.__anext__())
    return samples, burst / (time.perf_counter() - t0)

async def manager(m, n:int, burst:int):
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        job = await m.start_job('echo', text=f'msg {i}')
        await m.wait_for_job(job.id)
        samples.append((time.perf_counter() - t0) * 1e6)
    t0 = time.perf_counter()
    jobs = [await m.start_job('echo', text=f'msg {i}') for i in range(burst)]
    for job in jobs: await m.wait_for_job(job.id)
    m.clear_completed_jobs()
    return samples, burst / (time.perf_counter() - t0)

# ----- the run ----------------------------------------------------------------------------------------------
SIDES = ('bare_ray', 'ray_relay_floor', 'ray_manager', 'local_manager')

async def run(reps:int, n:int, burst:int) -> dict:
    actor, relay = Echo.remote(), Relay.remote()
    answers = relay.relay.options(num_returns='streaming').remote()
    managers = {'ray_manager': TextJobManager('bench', 'bench', worker_config=WorkerConfig(backend='ray')),
                'local_manager': TextJobManager('bench', 'bench', worker_config=WorkerConfig())}
    sides = {'bare_ray': lambda: bare_ray(actor, n, burst),
             'ray_relay_floor': lambda: ray_relay(relay, answers, n, burst),
             'ray_manager': lambda: manager(managers['ray_manager'], n, burst),
             'local_manager': lambda: manager(managers['local_manager'], n, burst)}
    try:
        await actor.echo.remote(None)
        for m in managers.values(): await m.start()
        for side in SIDES: await sides[side]()  # warm up: imports, first calls, the worker's plugin load
        out = {s: {'median': [], 'p99': [], 'throughput': []} for s in SIDES}
        for rep in range(reps):
            for side in SIDES[rep % len(SIDES):] + SIDES[:rep % len(SIDES)]:  # each side goes first in turn
                samples, throughput = await sides[side]()
                out[side]['median'].append(statistics.median(samples))
                out[side]['p99'].append(p99(samples))
                out[side]['throughput'].append(throughput)
        return out
    finally:
        for m in managers.values(): m.shutdown()
        ray.kill(actor); ray.kill(relay)

def summary(out:dict) -> dict:
    "Medians over repetitions, and the ratios taken within each repetition."
    med = statistics.median
    rows = {s: {k: med(v) for k, v in out[s].items()} for s in SIDES}
    within = lambda a, b, key: med([x / y for x, y in zip(out[a][key], out[b][key])])
    rows['ratios'] = {
        'latency_median_ray_manager_over_bare_ray': within('ray_manager', 'bare_ray', 'median'),
        'latency_p99_ray_manager_over_bare_ray': within('ray_manager', 'bare_ray', 'p99'),
        'latency_median_ray_relay_floor_over_bare_ray': within('ray_relay_floor', 'bare_ray', 'median'),
        'latency_median_ray_manager_over_ray_relay_floor': within('ray_manager', 'ray_relay_floor', 'median'),
        'latency_median_ray_manager_over_local_manager': within('ray_manager', 'local_manager', 'median'),
        'throughput_bare_ray_over_ray_manager': within('bare_ray', 'ray_manager', 'throughput'),
        'throughput_local_manager_over_ray_manager': within('local_manager', 'ray_manager', 'throughput'),
    }
    return rows

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true',
                    help='2 repetitions of 50 awaited and 200 pipelined echoes')
    ap.add_argument('--reps', type=int, help='repetitions (default 3)')
    ap.add_argument('--json', help='also write the results here')
    args = ap.parse_args()
    reps, n, burst = (2, 50, 200) if args.quick else (3, 300, 1000)
    reps = args.reps or reps
    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address='127.0.0.1', log_to_driver=False)
    try: rows = summary(asyncio.run(run(reps, n, burst)))
    finally: ray.shutdown()
    print(f"{'':18}{'latency median':>16}{'latency p99':>14}{'throughput':>14}   "
          f"({reps} reps; {n} awaited, {burst} pipelined; {os.cpu_count()} cores, ray {ray.__version__})")
    for s in SIDES:
        r = rows[s]
        print(f"{s:18}{r['median']:>13.0f} µs{r['p99']:>11.0f} µs{r['throughput']:>9.0f} /s")
    ratios = rows['ratios']
    met = ratios['latency_median_ray_manager_over_bare_ray'] <= 1.5
    for k, v in ratios.items(): print(f"  {k:48} {v:6.2f}")
    print(f"target: Ray-backed manager latency <= 1.5x bare Ray: {'met' if met else 'NOT met'}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({**rows, 'target_met': met, 'reps': reps, 'n': n, 'burst': burst,
                       'cores': os.cpu_count(), 'ray': ray.__version__}, f, indent=1)
    return 0

if __name__ == '__main__':
    sys.exit(main())
