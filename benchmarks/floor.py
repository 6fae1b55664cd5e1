"""The floor: what Python's multiprocessing costs anyway, whatever library sits on top of it.

A spawned echo worker sends back every message it gets, over two `multiprocessing.Queue`s (`QueueFloor`) or
over one duplex `multiprocessing.Pipe` (`PipeFloor`). Beside it, the standard library's own pool: a
`ProcessPoolExecutor` of one spawned worker running `echo`, awaited from asyncio as an app would. Spawn
imports this module in the worker, so it imports nothing but the standard library, and nothing at the top that
the echo workers do not need: the floor's worker must start as fast as a bare echo process can."""
import multiprocessing, os, signal, time
from multiprocessing.connection import wait

ctx = multiprocessing.get_context('spawn')  # as the library does; the host's start method is left alone

def queue_echo(requests, replies):
    "Floor worker: put every message from `requests` on `replies`, until `None`."
    while (msg := requests.get()) is not None: replies.put(msg)

def pipe_echo(conn):
    "Floor worker: send back every message received on `conn`, until `None`."
    while (msg := conn.recv()) is not None: conn.send(msg)

class QueueFloor:
    "A spawned `queue_echo` worker and its two queues."
    def __init__(self):
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=queue_echo, args=(self.requests, self.replies),
                                name='floor-queue-echo')
        self.proc.start()
    def send(self, msg): self.requests.put(msg)
    def recv(self): return self.replies.get()
    def stop(self):
        "Ask the worker to end and wait until it has."
        self.requests.put(None)
        self.proc.join()
        for q in (self.requests, self.replies): q.close(); q.join_thread()
    def kill(self) -> float: # Seconds from SIGKILL until the worker's sentinel is ready
        "SIGKILL the worker and wait on its sentinel, as a supervisor would."
        t0 = time.perf_counter()
        os.kill(self.proc.pid, signal.SIGKILL)
        wait([self.proc.sentinel])
        seconds = time.perf_counter() - t0
        self.proc.join()
        for q in (self.requests, self.replies): q.close(); q.cancel_join_thread()
        return seconds

class PipeFloor:
    "A spawned `pipe_echo` worker and its end of one duplex pipe."
    def __init__(self):
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=pipe_echo, args=(child_conn,), name='floor-pipe-echo')
        self.proc.start()
        child_conn.close()  # the worker has its own copy now
    def send(self, msg): self.conn.send(msg)
    def recv(self): return self.conn.recv()
    def stop(self):
        self.conn.send(None)
        self.proc.join()
        self.conn.close()

# ----- the floor's side of each shape: the same work as benchmarks/library.py does through a job manager ----
def round_trips(floor, n:int, msg) -> list: # Seconds of each of `n` sequential round trips
    "Send `msg` and wait for its echo, `n` times."
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        floor.send(msg)
        floor.recv()
        out.append(time.perf_counter() - t0)
    return out

def pipelined(floor, n:int, msg, window:int=64) -> float: # Messages per second
    ("Echo `n` messages with up to `window` in flight; "
     "a bounded window so that neither pipe can fill and block.")
    t0, sent, got = time.perf_counter(), 0, 0
    while got < n:
        while sent < n and sent - got < window: floor.send(msg); sent += 1
        floor.recv(); got += 1
    return n / (time.perf_counter() - t0)

def cold_start(msg) -> tuple: # (seconds from spawn to the first echo, the running `QueueFloor`)
    "Spawn a `QueueFloor` and wait for its first echo."
    t0 = time.perf_counter()
    floor = QueueFloor()
    floor.send(msg)
    floor.recv()
    return time.perf_counter() - t0, floor

def cold_starts(n:int, msg) -> float: # Seconds for `n` cold starts in a row, each to its first echo
    ("Spawn `n` `QueueFloor`s one after the other, as a pool of `n` started by hand; "
     "all run until the last echoes.")
    t0, floors = time.perf_counter(), []
    for _ in range(n): floors.append(cold_start(msg)[1])
    seconds = time.perf_counter() - t0
    for f in floors: f.stop()
    return seconds

def stop_time(floor) -> float: # Seconds to stop an idle floor worker
    t0 = time.perf_counter()
    floor.stop()
    return time.perf_counter() - t0

def memory_probe(n:int, msg, conn):
    ("Spawned by the benchmark: RSS growth per echo over `n` echoes of a fresh `QueueFloor`; "
     "sends it on `conn`.")
    import psutil  # here, not at the top: the echo workers stay bare
    me, floor = psutil.Process(), QueueFloor()
    pipelined(floor, min(n, 500), msg)
    before = me.memory_info().rss
    pipelined(floor, n, msg)
    conn.send((me.memory_info().rss - before) / n)
    floor.stop()

# ----- ProcessPoolExecutor(max_workers=1): the standard library's pool, awaited through asyncio -------------
# asyncio and concurrent.futures are imported where they are used, so that the echo workers above stay bare
def echo(msg): return msg  # the executor's job: by reference, so its worker imports this module

def pool_executor():
    "A `ProcessPoolExecutor` of one spawned worker; it spawns the worker at its first submission."
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(max_workers=1, mp_context=ctx)

async def pool_round_trips(pool, n:int, msg) -> list: # Seconds of each of `n` sequential round trips
    "Submit `echo(msg)` and await its result, `n` times."
    import asyncio
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await asyncio.wrap_future(pool.submit(echo, msg))
        out.append(time.perf_counter() - t0)
    return out

async def pool_throughput(pool, n:int, msg) -> float: # Messages per second
    "Submit `n` echoes back to back, then await them all."
    import asyncio
    t0 = time.perf_counter()
    await asyncio.gather(*[asyncio.wrap_future(pool.submit(echo, msg)) for _ in range(n)])
    return n / (time.perf_counter() - t0)
