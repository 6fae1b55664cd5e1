"""Issue 22: cancel a streaming job after its third chunk; how long until the next job's first chunk, for a plugin
that takes 0.5 s to load. Stop (the default, `cancel_grace_seconds=2`) against kill (`cancel_grace_seconds=0`, what
the documented system does), alternating in the same run, median of 5 each.

    python benchmarks/cancel.py [--reps N]"""
import asyncio, os, statistics, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE, os.path.join(os.path.dirname(HERE), 'tests')):
    if path not in sys.path: sys.path.insert(0, path)

LOAD = {'load_seconds': 0.5}  # the scenario plugin sleeps this long in its load

async def once(grace:float) -> tuple: # (seconds from the cancel to the next job's first chunk, loads of the plugin)
    from cjm_fasthtml_workers.core.config import WorkerConfig
    from helpers import TextJobManager as Manager  # the tests' manager over the scenario plugins
    m = Manager('cancel', 'bench', supports_streaming=True,
                worker_config=WorkerConfig(cancel_grace_seconds=grace, restart_policy='always'))
    try:
        await m.start()
        assert await m.reload_plugin('stream', LOAD)
        words = ' '.join(f'w{i}' for i in range(10_000))
        job = await m.start_job('stream', text=words, delay=0.01, stream=True)
        while len(m.get_job_chunks(job.id)) < 3: await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        await m.cancel_job(job.id)
        nxt = await m.start_job('stream', text='first second', stream=True)
        while not m.get_job_chunks(nxt.id): await asyncio.sleep(0.0005)
        took = time.perf_counter() - t0
        await m.wait_for_job(nxt.id, 30)
        history = await m.wait_for_job((await m.start_job('history')).id, 30)
        return took, history.result['events'].count('load stream') + history.result['events'].count('reload stream')
    finally: m.shutdown()

def main():
    reps = int(sys.argv[sys.argv.index('--reps') + 1]) if '--reps' in sys.argv else 5
    stop, kill = [], []
    for _ in range(reps):
        stop.append(asyncio.run(once(2.0)))
        kill.append(asyncio.run(once(0.0)))
    s, k = statistics.median(t for t, _ in stop), statistics.median(t for t, _ in kill)
    print(f"cancel -> next job's first chunk, plugin load 0.5 s: stop {s * 1000:.1f} ms "
          f"(loads per run: {sorted({n for _, n in stop})}), kill {k * 1000:.1f} ms "
          f"(loads per run: {sorted({n for _, n in kill})}); stop/kill {s / k:.3f}x; target <= 50 ms: "
          f"{'met' if s <= 0.05 else 'missed'}")

if __name__ == '__main__': main()
