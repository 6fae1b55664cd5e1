"""Issue 22: batched execution. The scenario plugin `batch` costs 50 ms a call and 5 ms an item.

1. Throughput: 64 jobs submitted at once, `max_batch_size=8` against 1 (no batching), same run. Target >= 4x.
2. A job submitted alone: its end with `batch_wait_ms=10` against unbatched. Target: at most 10 + 5 ms later.

    python benchmarks/batch.py [--reps N]"""
import asyncio, os, statistics, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE, os.path.join(os.path.dirname(HERE), 'tests')):
    if path not in sys.path: sys.path.insert(0, path)

async def throughput(size:int, n:int=64) -> float: # jobs per second
    from cjm_fasthtml_workers.core.config import PluginPolicy
    from helpers import make
    m, _ = make(1, events=None, plugin_policies={'batch': PluginPolicy(max_batch_size=size)})
    try:
        await m.start()
        await m.wait_for_job((await m.start_job('batch', text='warm')).id, 30)
        t0 = time.perf_counter()
        jobs = [await m.start_job('batch', text=str(i)) for i in range(n)]
        for j in jobs: await m.wait_for_job(j.id, 60)
        return n / (time.perf_counter() - t0)
    finally: m.shutdown()

async def alone(size:int) -> float: # seconds from submission to the end of a job submitted alone
    from cjm_fasthtml_workers.core.config import PluginPolicy
    from helpers import make
    m, _ = make(1, events=None, plugin_policies={'batch': PluginPolicy(max_batch_size=size, batch_wait_ms=10)})
    try:
        await m.start()
        await m.wait_for_job((await m.start_job('batch', text='warm')).id, 30)
        took = []
        for _ in range(5):
            t0 = time.perf_counter()
            await m.wait_for_job((await m.start_job('batch', text='alone')).id, 30)
            took.append(time.perf_counter() - t0)
        return statistics.median(took)
    finally: m.shutdown()

def main():
    reps = int(sys.argv[sys.argv.index('--reps') + 1]) if '--reps' in sys.argv else 3
    ratios, extra = [], []
    for _ in range(reps):
        one, eight = asyncio.run(throughput(1)), asyncio.run(throughput(8))
        ratios.append(eight / one)
        extra.append(asyncio.run(alone(8)) - asyncio.run(alone(1)))
    r, e = statistics.median(ratios), statistics.median(extra)
    print(f"64 jobs, batch of 8 against 1: {r:.2f}x the throughput (target >= 4x: {'met' if r >= 4 else 'missed'})")
    print(f"a job alone, batch_wait_ms=10: {e * 1000:.1f} ms later than unbatched "
          f"(target <= 15 ms: {'met' if e <= 0.015 else 'missed'})")

if __name__ == '__main__': main()
