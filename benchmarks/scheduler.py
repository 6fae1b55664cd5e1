"""Issue 20's scheduling benchmarks, each a ratio against a baseline measured in the same run.

    python benchmarks/scheduler.py            # about 30 s
    python benchmarks/scheduler.py --quick    # a smoke run

1. Cost per dispatch: 10,000 waiting jobs of 100 owners taken one at a time through `scheduler.assign`
   (priority, owners in turn, affinity), against the same jobs of one owner (plain FIFO). Target <= 2x.
2. ETA error: 20 sleep jobs of known length on 2 workers; each job's `estimated_wait` when the previous jobs
   of the same length had run (the averages known), against the time it really waited. Target: median error
   <= 25 %."""
import asyncio, os, statistics, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE, os.path.join(os.path.dirname(HERE), 'tests')):
    if path not in sys.path: sys.path.insert(0, path)

from cjm_fasthtml_workers.managers.scheduler import WaitingJobs, WorkerView, assign

def dispatch_cost(owners:int, n:int=10_000) -> float: # seconds per job handed out
    "Fill a queue with `n` jobs of `owners` owners over 4 plugins; hand them out one at a time to 4 workers."
    w = WaitingJobs()
    for i in range(n): w.push(f'j{i}', f'p{i % 4}', owner=f'o{i % owners}', priority=i % 2)
    pool = [WorkerView(k, f'p{k}') for k in range(4)]
    t0 = time.perf_counter()
    while len(w):
        for v in pool: v.free = False
        pool[len(w) % 4].free = True
        assign(w, pool)
    return (time.perf_counter() - t0) / n

async def eta_errors(jobs:int=20, seconds:float=0.2) -> list:
    ("Relative errors of `estimated_wait` for `jobs` sleep jobs of `seconds` on 2 workers "
     "(after 4 to learn from).")
    from cjm_fasthtml_workers.core.config import WorkerConfig
    from helpers import TextJobManager as Manager  # the tests' manager over the scenario plugins
    m = Manager('eta', 'bench', worker_config=WorkerConfig(max_workers=2))
    try:
        await m.start()
        for j in [await m.start_job('sleep', seconds=seconds) for _ in range(4)]: await m.wait_for_job(j.id)
        submitted = []
        for _ in range(jobs):
            job = await m.start_job('sleep', seconds=seconds)
            submitted.append((job, time.monotonic(), m.estimated_wait(job.id)))
        errors = []
        for job, at, eta in submitted:
            while job.status == 'pending': await asyncio.sleep(0.002)
            waited = time.monotonic() - at
            if eta is not None and waited > seconds / 2:  # jobs that started at once have no wait to err on
                errors.append(abs(eta - waited) / waited)
        for job, *_ in submitted: await m.wait_for_job(job.id)
        return errors
    finally: m.shutdown()

def main():
    quick = '--quick' in sys.argv
    n = 2_000 if quick else 10_000
    fifo = min(dispatch_cost(1, n) for _ in range(3))
    fair = min(dispatch_cost(100, n) for _ in range(3))
    print(f"dispatch, {n} waiting jobs: 1 owner {fifo * 1e6:.1f} µs/job, "
          f"100 owners {fair * 1e6:.1f} µs/job: {fair / fifo:.2f}x "
          f"(target <= 2x: {'met' if fair / fifo <= 2 else 'missed'})")
    errors = asyncio.run(eta_errors(8 if quick else 20))
    med = statistics.median(errors) if errors else float('nan')
    print(f"ETA of sleep jobs on 2 workers: median error {med * 100:.1f} % over {len(errors)} jobs "
          f"(target <= 25 %: {'met' if med <= 0.25 else 'missed'})")

if __name__ == '__main__': main()
