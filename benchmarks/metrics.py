"""Benchmark of a Prometheus scrape (issue 23): `generate_latest` of a registry holding a `ManagerCollector`
of a manager that holds 10,000 jobs (5,000 finished, one running, the rest waiting), against the same scrape
of the same manager holding none, in the same run. Target: < 50 ms.

    python benchmarks/metrics.py            # 10,000 jobs, 30 scrapes each
    python benchmarks/metrics.py --jobs 2000 --scrapes 10"""
import argparse, asyncio, os, statistics, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), 'tests')):  # this checkout's library
    if path not in sys.path: sys.path.insert(0, path)

from helpers import TextJobManager  # the tests' manager over the scenario plugins


def timed_scrapes(registry, n:int) -> list: # ms of each scrape
    from prometheus_client import generate_latest
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        generate_latest(registry)
        out.append((time.perf_counter() - t0) * 1e3)
    return out

async def main(jobs:int, scrapes:int) -> int:
    from prometheus_client import CollectorRegistry
    from cjm_fasthtml_workers.extensions.metrics import ManagerCollector
    m = TextJobManager('bench', 'bench')
    registry = CollectorRegistry()
    registry.register(ManagerCollector(m))
    try:
        await m.start()
        empty = timed_scrapes(registry, scrapes)  # the baseline: the same manager holding no job
        finished = jobs // 2
        submitted = [await m.start_job('echo', text=str(i)) for i in range(finished)]
        await m.wait_for_job(submitted[-1].id, timeout=300)
        hang = await m.start_job('hang')
        for i in range(jobs - finished - 1): await m.start_job('echo', text=str(i))
        while m.get_job(hang.id).status != 'running': await asyncio.sleep(0.01)
        held = len(m.get_all_jobs())
        # as metrics_route runs it: off the loop
        full = await asyncio.to_thread(timed_scrapes, registry, scrapes)
    finally: m.shutdown()
    med_empty, med_full = statistics.median(empty), statistics.median(full)
    met = med_full < 50
    print(f"scrape, {held} jobs held: {med_full:.2f} ms median (min {min(full):.2f}, max {max(full):.2f}); "
          f"target < 50 ms: {'met' if met else 'NOT met'}")
    print(f"scrape, no job held:    {med_empty:.2f} ms median; ratio {med_full / med_empty:.1f}x")
    return 0

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--jobs', type=int, default=10_000)
    p.add_argument('--scrapes', type=int, default=30)
    a = p.parse_args()
    sys.exit(asyncio.run(main(a.jobs, a.scrapes)))
