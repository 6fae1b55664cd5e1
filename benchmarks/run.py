"""Benchmarks: what the job manager costs on top of the raw multiprocessing floor (issue 6).

    python benchmarks/run.py                 # every shape, 5 repetitions: a few minutes
    python benchmarks/run.py --quick         # small sizes, 2 repetitions: keeps the script working (CI)
    python benchmarks/run.py --reps 9 --json /tmp/bench.json

The shapes, repetitions and table are in suite.py; the floor's side is floor.py, the library's library.py."""
import os, sys

HERE = os.path.dirname(os.path.abspath(__file__))
# A spawned floor worker imports `floor` by name, and a child gets its parent's sys.path. The repository root
# goes on it too, so that the library measured is this checkout's.
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path: sys.path.insert(0, path)

# Spawn runs this file again in every worker, the floor's and the library's alike. Everything else is imported
# under the guard, so that a floor worker stays a bare echo process and a library worker imports only what it
# needs.
if __name__ == '__main__':
    import suite
    sys.exit(suite.main())
