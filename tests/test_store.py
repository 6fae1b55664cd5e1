("The durable job store: round trips, order, batching, recovery, retention, the lock, "
 "corrupt and locked files.")
import asyncio, logging, os, pickle, sqlite3, stat, subprocess, sys, tempfile, threading, time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from cjm_fasthtml_workers.managers import store as store_module
from cjm_fasthtml_workers.managers.base import BaseJob
from cjm_fasthtml_workers.managers.store import INTERRUPTED, JobStoreError, SQLiteJobStore

REPO = Path(__file__).resolve().parents[1]


@dataclass
class TranscriptionJob(BaseJob):
    "A job type of an app, with fields of its own."
    audio_path: str = ''
    language: Optional[str] = None
    segments: List[dict] = field(default_factory=list)


def job(i, status='pending', **kw) -> BaseJob:
    return BaseJob(id=f'j{i:05d}', plugin_id='echo', status=status, **kw)


def rows(path, namespace='t') -> list:
    "(id, status, attempts) of each stored job, in submission order, read by a connection of its own."
    with closing(sqlite3.connect(path)) as db:
        return db.execute('SELECT id, status, attempts FROM worker_jobs WHERE namespace = ? ORDER BY seq',
                          (namespace,)).fetchall()


@pytest.fixture
def stores():
    "Makes SQLiteJobStores; every one is closed when the test ends."
    made = []
    def make(path, **kw):
        made.append(SQLiteJobStore(path, **kw))
        return made[-1]
    yield make
    for s in made: s.close()


def reopen(stores, path, namespace='t', **kw) -> tuple:
    "A new store on `path`: (the store, the jobs it read back)."
    s = stores(path, **kw)
    return s, s.open(namespace)


def test_custom_job_type_round_trips(tmp_path, stores):
    s, _ = reopen(stores, tmp_path/'j.db')
    j = TranscriptionJob('t1', 'whisper', status='completed', audio_path='/a.wav', language='fr',
                         segments=[{'start': 0.0, 'text': 'bonjour'}], result={'text': 'bonjour'},
                         metadata={'user': 7}, progress=1.0, worker_pid=123,
                         completed_at='2026-01-01T00:00:01')
    s.write([j], lambda: None)
    s.close()
    _, back = reopen(stores, tmp_path/'j.db')
    assert back == [j] and type(back[0]) is TranscriptionJob


def test_then_runs_after_the_row_is_readable_in_order(tmp_path, stores):
    s, _ = reopen(stores, tmp_path/'j.db')
    seen, threads = [], set()
    def then(i):
        def announce():
            threads.add(threading.current_thread().name)
            seen.append((i, rows(tmp_path/'j.db')))  # a second connection, as another reader would
        return announce
    for i in range(20): s.write([job(i)], then(i))
    assert s.flush()
    assert [i for i, _ in seen] == list(range(20))  # callbacks in the order of the writes
    for i, found in seen: assert (f'j{i:05d}', 'pending', 0) in found
    assert threads == {'t-job-store'}  # the writer thread, not the caller's


def test_a_later_change_is_not_written(tmp_path, stores):
    s, _ = reopen(stores, tmp_path/'j.db')
    j = job(1)
    s.write([j], lambda: None)
    j.status, j.error = 'failed', 'changed after write()'
    assert s.flush() and rows(tmp_path/'j.db') == [('j00001', 'pending', 0)]


def test_batching_10000_jobs(tmp_path, stores, monkeypatch):
    "10,000 jobs through their life (pending, running, completed): few transactions; the cost is printed."
    commits = []
    real = store_module.commit_items
    def counting(db, items, *args, **kw):
        commits.append(len(items))
        return real(db, items, *args, **kw)
    monkeypatch.setattr(store_module, 'commit_items', counting)
    s, _ = reopen(stores, tmp_path/'j.db')
    jobs = [job(i) for i in range(10_000)]
    t0 = time.perf_counter()
    for j in jobs: s.write([j], lambda: None)
    for j in jobs:
        j.status = 'running'
        s.write([j], lambda: None)
    for j in jobs:
        j.status, j.result = 'completed', {'text': 'ok'}
        s.write([j], lambda: None)
    queued = time.perf_counter() - t0
    assert s.flush(60)
    total = time.perf_counter() - t0
    print(f"\n30,000 write() calls for 10,000 jobs: {queued / 30_000 * 1e6:.1f} us a call (caller's thread), "
          f"{total / 10_000 * 1e3:.3f} ms a job until all committed; {len(commits)} transactions "
          f"(largest {max(commits)} writes)")
    assert len(commits) <= 3_000, f"{len(commits)} transactions for 30,000 writes"
    assert rows(tmp_path/'j.db')[-1] == ('j09999', 'completed', 1)
    assert len(rows(tmp_path/'j.db')) == 10_000


def test_a_lone_job_through_its_life(tmp_path, stores):
    "One job at a time, each state waited for (what an idle app sees): the latency of a commit is printed."
    s, _ = reopen(stores, tmp_path/'j.db')
    done = threading.Event()
    t0 = time.perf_counter()
    for i in range(300):
        j = job(i)
        for status in ('pending', 'running', 'completed'):
            j.status = status
            done.clear()
            s.write([j], done.set)
            assert done.wait(5)
    print(f"\none job at a time: {(time.perf_counter() - t0) / 300 * 1e3:.3f} ms a job for 3 waited commits")


def test_the_event_loop_is_not_stalled(tmp_path, stores):
    "10,000 submissions from the loop while the writer commits: the loop's longest stall is printed."
    s, _ = reopen(stores, tmp_path/'j.db')
    async def run() -> list:
        lags, running = [], True
        async def ticker():
            while running:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)
        tick = asyncio.create_task(ticker())
        for k in range(200):
            for i in range(50): s.write([job(50 * k + i)], lambda: None)
            await asyncio.sleep(0.0005)  # 50 jobs every ~0.5 ms: a busy app, and the ticker gets its turns
        assert await asyncio.to_thread(s.flush, 30)
        running = False
        await tick
        return sorted(lags)
    lags = asyncio.run(run())
    print(f"\nevent loop lag while 10,000 jobs were written: max {lags[-1] * 1e3:.2f} ms, "
          f"p99 {lags[int(len(lags) * 0.99)] * 1e3:.2f} ms over {len(lags)} ticks")
    assert len(rows(tmp_path/'j.db')) == 10_000


def test_recovery_fail(tmp_path, stores):
    s, _ = reopen(stores, tmp_path/'j.db')
    left = [job(1, 'completed', result={'x': 1}), job(2, 'running', worker_pid=9), job(3), job(4)]
    s.write(left, lambda: None)
    s.close()
    s, back = reopen(stores, tmp_path/'j.db')
    assert [(j.id, j.status) for j in back] == [('j00001', 'completed'), ('j00002', 'failed'),
                                                ('j00003', 'pending'), ('j00004', 'pending')]
    failed = back[1]
    assert failed.error == INTERRUPTED == 'interrupted by an app restart' and failed.completed_at
    assert back[0].result == {'x': 1}
    assert rows(tmp_path/'j.db')[1] == ('j00002', 'failed', 1)  # written at open, before anything runs
    s.close()
    _, again = reopen(stores, tmp_path/'j.db')  # a second restart changes nothing (at most once)
    assert again[1] == failed


def test_recovery_requeue_counts_attempts(tmp_path, stores):
    path = tmp_path/'j.db'
    s, _ = reopen(stores, path, recovery='requeue', max_attempts=2)
    j = job(1, 'running', started_at='t', worker_pid=9, progress=0.5)
    s.write([job(0), j], lambda: None)
    s.close()
    s, back = reopen(stores, path, recovery='requeue', max_attempts=2)
    assert [(b.id, b.status) for b in back] == [('j00000', 'pending'), ('j00001', 'pending')]
    assert (back[1].started_at, back[1].worker_pid, back[1].progress) == (None, None, None)
    assert s.attempts('j00001') == 1 and rows(path)[1] == ('j00001', 'pending', 1)
    s.close()
    # the app died again before the job ran: it is still pending, with one attempt
    s, back = reopen(stores, path, recovery='requeue', max_attempts=2)
    assert back[1].status == 'pending' and s.attempts('j00001') == 1
    back[1].status = 'running'
    s.write([back[1]], lambda: None)  # started a second time
    s.close()
    s, back = reopen(stores, path, recovery='requeue', max_attempts=2)
    assert back[1].status == 'failed' and s.attempts('j00001') == 2
    assert back[1].error == 'interrupted by an app restart 2 times; not run again (max_attempts=2)'
    assert back[0].status == 'pending'  # never started: runs again in its place


def test_retention_keeps_the_newest_finished(tmp_path, stores):
    s, _ = reopen(stores, tmp_path/'j.db', retention=3)
    s.write([job(0)], lambda: None)
    for i in range(1, 7): s.write([job(i, 'completed', completed_at=f'2026-01-01T00:00:0{i}')], lambda: None)
    assert s.flush()
    assert [r[0] for r in rows(tmp_path/'j.db')] == ['j00000', 'j00004', 'j00005', 'j00006']
    s.close()
    _, back = reopen(stores, tmp_path/'j.db', retention=1)  # a smaller bound applies at open
    assert [j.id for j in back] == ['j00000', 'j00006']


def test_delete(tmp_path, stores):
    s, _ = reopen(stores, tmp_path/'j.db')
    s.write([job(1, 'completed'), job(2, 'failed'), job(3)], lambda: None)
    gone = []
    s.delete(['j00001', 'j00002'], lambda: gone.append(rows(tmp_path/'j.db')))
    assert s.flush() and gone == [[('j00003', 'pending', 0)]]
    s.close()
    assert [j.id for j in reopen(stores, tmp_path/'j.db')[1]] == ['j00003']


def test_namespaces_share_a_file(tmp_path, stores):
    a, _ = reopen(stores, tmp_path/'j.db', namespace='transcription')
    b, _ = reopen(stores, tmp_path/'j.db', namespace='llm')
    a.write([job(1)], lambda: None)
    b.write([job(2)], lambda: None)
    with pytest.raises(JobStoreError, match="namespace 'llm' .* open already in this process"):
        stores(tmp_path/'j.db').open('llm')
    a.close(); b.close()
    assert [j.id for j in reopen(stores, tmp_path/'j.db', namespace='llm')[1]] == ['j00002']


_OPEN_IN_CHILD = """
import sys
from cjm_fasthtml_workers.managers.store import JobStoreError, SQLiteJobStore
try: jobs = SQLiteJobStore(sys.argv[1]).open('t')
except JobStoreError as e:
    print(e)
    sys.exit(3)
print(len(jobs))
"""


def test_a_second_process_is_refused(tmp_path, stores, no_leftover_processes):
    s, _ = reopen(stores, tmp_path/'j.db')
    s.write([job(1)], lambda: None)
    child = subprocess.run([sys.executable, '-c', _OPEN_IN_CHILD, str(tmp_path/'j.db')], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 3, child.stderr
    assert f'in use by another process (pid {os.getpid()})' in child.stdout
    s.close()  # lets go of the lock: now the other process may have it
    child = subprocess.run([sys.executable, '-c', _OPEN_IN_CHILD, str(tmp_path/'j.db')], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert (child.returncode, child.stdout.strip()) == (0, '1'), child.stderr


def test_a_corrupt_file_is_refused_and_left_as_it_is(tmp_path, stores):
    path = tmp_path/'j.db'
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    for _ in range(2):  # the lock is let go after the failure: the second try reads the same error
        with pytest.raises(JobStoreError, match='cannot be used as a job store'):
            stores(path).open('t')
    assert path.read_bytes() == garbage


def test_an_unreadable_row_is_kept_and_the_rest_read(tmp_path, stores, caplog):
    s, _ = reopen(stores, tmp_path/'j.db')
    s.write([job(1), job(2)], lambda: None)
    s.close()
    with closing(sqlite3.connect(tmp_path/'j.db')) as db, db:
        db.execute("UPDATE worker_jobs SET blob = x'80057d' WHERE id = 'j00001'")  # a truncated pickle
    with caplog.at_level(logging.ERROR, logger=store_module.__name__):
        _, back = reopen(stores, tmp_path/'j.db')
    assert [j.id for j in back] == ['j00002'] and 'j00001 cannot be read back' in caplog.text
    assert len(rows(tmp_path/'j.db')) == 2


def test_a_locked_database_fails_open_in_bounded_time(tmp_path, stores):
    path = tmp_path/'j.db'
    s, _ = reopen(stores, path)
    s.close()
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute('BEGIN EXCLUSIVE')
        s = stores(path)
        s.lock_timeout = 0.3
        t0 = time.monotonic()
        with pytest.raises(JobStoreError, match='locked by another connection'):
            s.open('t')
        assert time.monotonic() - t0 < 3
        other.execute('COMMIT')
    assert reopen(stores, path)[1] == []  # nothing was held on to by the failed open


def test_a_write_waits_out_a_lock_and_is_announced_after(tmp_path, stores, caplog):
    path = tmp_path/'j.db'
    s, _ = reopen(stores, path)
    s._db.execute('PRAGMA busy_timeout = 100')  # the writer's connection: retry soon
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute('BEGIN EXCLUSIVE')
        announced = threading.Event()
        with caplog.at_level(logging.WARNING, logger=store_module.__name__):
            s.write([job(1)], announced.set)
            assert not announced.wait(0.8)  # not stored, so not announced
            assert store_module.is_busy(s.error) and rows(path) == []
            other.execute('COMMIT')
            assert announced.wait(10) and rows(path) == [('j00001', 'pending', 0)]
    assert s.error is None and 'retrying' in caplog.text


@pytest.mark.skipif(not hasattr(sqlite3.Connection, 'setlimit'), reason='needs Python 3.11')
def test_a_row_sqlite_refuses_is_left_out_and_the_rest_written(tmp_path, stores, caplog):
    s, _ = reopen(stores, tmp_path/'j.db')
    s._db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 4000)  # stands in for a record over sqlite's 1 GB limit
    announced = threading.Event()
    with caplog.at_level(logging.ERROR, logger=store_module.__name__):
        s.write([job(1), job(2, result={'text': 'x' * 10_000}), job(3)], announced.set)
        assert announced.wait(10)
    assert [r[0] for r in rows(tmp_path/'j.db')] == ['j00001', 'j00003']
    assert 'job j00002 cannot be stored' in caplog.text


def test_loading_10000_jobs(tmp_path, stores):
    s, _ = reopen(stores, tmp_path/'j.db')
    s.write([job(i, 'completed', result={'text': f'result {i}'}, metadata={'n': i}, completed_at='2026-01-01')
             for i in range(9_000)] + [job(i) for i in range(9_000, 10_000)], lambda: None)
    s.close()
    t0 = time.perf_counter()
    _, back = reopen(stores, tmp_path/'j.db')
    took = time.perf_counter() - t0
    print(f"\nopen() read back 10,000 jobs in {took * 1e3:.1f} ms")
    assert len(back) == 10_000 and back[-1].id == 'j09999' and back[5].result == {'text': 'result 5'}


def test_an_unpicklable_job_is_refused_at_check_and_write(tmp_path, stores):
    s, _ = reopen(stores, tmp_path/'j.db')
    bad = BaseJob('j1', 'whisper', metadata={'callback': lambda: None})
    with pytest.raises(TypeError, match="job j1 of plugin 'whisper' cannot be stored: .* does not pickle"):
        s.check(bad)
    with pytest.raises(TypeError, match="plugin 'whisper'"):
        s.write([job(2), bad], lambda: None)
    assert s.flush() and rows(tmp_path/'j.db') == []  # nothing of that call was queued


def test_close_is_idempotent_and_later_writes_are_dropped(tmp_path, stores, caplog):
    s, _ = reopen(stores, tmp_path/'j.db')
    s.write([job(1)], lambda: None)
    s.close(); s.close()
    assert rows(tmp_path/'j.db') == [('j00001', 'pending', 0)]  # close committed what was queued
    with caplog.at_level(logging.WARNING, logger=store_module.__name__):
        s.write([job(2)], lambda: None)
    assert 'closed' in caplog.text and len(rows(tmp_path/'j.db')) == 1
    with pytest.raises(JobStoreError, match='opened before'): s.open('t')
    with pytest.raises(JobStoreError, match='not open'):
        SQLiteJobStore(tmp_path/'k.db').write([job(1)], print)


_EXIT_WITHOUT_CLOSE = """
import sys
from cjm_fasthtml_workers.managers.base import BaseJob
from cjm_fasthtml_workers.managers.store import SQLiteJobStore
s = SQLiteJobStore(sys.argv[1])
s.open('t')
s.write([BaseJob(f'j{i}', 'echo') for i in range(1000)], lambda: None)
"""


def test_what_is_queued_is_written_at_interpreter_exit(tmp_path, no_leftover_processes):
    child = subprocess.run([sys.executable, '-c', _EXIT_WITHOUT_CLOSE, str(tmp_path/'j.db')], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert len(rows(tmp_path/'j.db')) == 1000


# ----- private files, records that run no code (issue 18) ---------------------------------------------------
def mode(path) -> int: return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_000():
    "The most permissive umask: what the store makes must be private all the same."
    old = os.umask(0o000)
    yield
    os.umask(old)


def test_the_files_and_directories_it_makes_are_private_whatever_the_umask(tmp_path, stores, umask_000):
    path = tmp_path/'data'/'app'/'jobs.sqlite'  # neither directory is there yet
    s, _ = reopen(stores, path)
    s.write([job(1)], lambda: None)
    assert s.flush()
    made = {p: mode(p) for p in (tmp_path/'data', tmp_path/'data'/'app', path, f'{path}-wal', f'{path}-shm',
                                 f'{path}.lock')}
    assert made == {**{p: 0o700 for p in list(made)[:2]}, **{p: 0o600 for p in list(made)[2:]}}, made
    s.close()
    _, back = reopen(stores, path)  # what it made it accepts
    assert [j.id for j in back] == ['j00001']


@pytest.mark.parametrize('dir_mode, error', [(0o755, None), (0o700, None),
                                             (0o777, 'writable by its group and others (mode 777)'),
                                             (0o757, 'writable by others (mode 757)'),
                                             (0o1777, 'is a shared directory (mode 1777)')],
                         ids=['0755', '0700', '0777', '0757', '1777'])
def test_a_directory_others_may_write_to_is_refused(tmp_path, stores, dir_mode, error):
    folder = tmp_path/'d'
    folder.mkdir()
    folder.chmod(dir_mode)
    if error is None:  # a directory made with the default umask 022, or one of the user's own
        reopen(stores, folder/'jobs.db')
        return
    with pytest.raises(JobStoreError) as e: reopen(stores, folder/'jobs.db')
    assert error in str(e.value) and str(folder) in str(e.value), e.value
    assert ('mkdir -m 700' if dir_mode & stat.S_ISVTX else 'chmod go-w') in str(e.value)
    assert os.listdir(folder) == []  # refused before anything was made in it


def test_the_shared_temp_directory_itself_is_refused(stores):
    tmp = tempfile.gettempdir()
    if not os.stat(tmp).st_mode & 0o002: pytest.skip(f"{tmp} is not writable by others here")
    with pytest.raises(JobStoreError, match='shared directory|writable by'):
        reopen(stores, os.path.join(tmp, f'cjm-store-test-{os.getpid()}.db'))
    assert not os.path.exists(os.path.join(tmp, f'cjm-store-test-{os.getpid()}.db'))


@pytest.mark.parametrize('suffix', ['', '-wal', '-shm', '.lock'])
def test_a_file_others_may_write_to_is_refused(tmp_path, stores, suffix):
    path = tmp_path/'jobs.db'
    s, _ = reopen(stores, path)
    s.write([job(1)], lambda: None)
    s.flush()
    os.chmod(f'{path}{suffix}', 0o666)  # the -wal and -shm stay while the store is open
    s.close()
    Path(f'{path}{suffix}').touch()  # sqlite removes the -wal and -shm at its last close: here they are again
    os.chmod(f'{path}{suffix}', 0o666)
    with pytest.raises(JobStoreError) as e: reopen(stores, path)
    assert f'{path}{suffix} is writable by its group and others (mode 666)' in str(e.value), e.value
    assert f'chmod go-w {path}{suffix}' in str(e.value)


def test_a_group_writable_directory_is_fine_only_for_the_users_private_group(tmp_path, stores):
    folder = tmp_path/'d'
    folder.mkdir()
    folder.chmod(0o775)  # what umask 002 makes, on systems that give each user a group of their own
    private = store_module.private_group(os.stat(folder).st_gid, os.geteuid())
    if private: reopen(stores, folder/'jobs.db')
    else:
        with pytest.raises(JobStoreError, match='writable by its group'): reopen(stores, folder/'jobs.db')


needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="giving a file to another user (os.chown) needs root")


@needs_root
@pytest.mark.parametrize('what', ['directory', 'database', 'lock'])
def test_files_of_another_user_are_refused(tmp_path, stores, what):
    folder = tmp_path/'d'
    folder.mkdir()
    path = folder/'jobs.db'
    if what != 'directory':
        reopen(stores, path)[0].close()
    planted = {'directory': folder, 'database': path, 'lock': f'{path}.lock'}[what]
    os.chown(planted, 65534, 65534)  # nobody: as if another user had made it first
    with pytest.raises(JobStoreError) as e: reopen(stores, path)
    assert f'{planted} is owned by uid 65534, not by this user (uid 0)' in str(e.value), e.value


def test_a_database_others_may_read_is_used_with_a_warning(tmp_path, stores, caplog):
    path = tmp_path/'jobs.db'
    reopen(stores, path)[0].close()
    path.chmod(0o644)  # as an older version made it
    with caplog.at_level(logging.WARNING, logger=store_module.__name__): reopen(stores, path)
    assert 'readable by other users (mode 644)' in caplog.text and f'chmod 600 {path}' in caplog.text


class Planted:
    "A record someone could plant: unpickling it runs a shell command."
    def __init__(self, command): self.command = command
    def __reduce__(self): return (os.system, (self.command,))


@dataclass
class Segment:
    "A type of the app's own that its jobs hold: read back once the app allows it."
    text: str = ''


def plant(path, job_id, blob, status='pending', namespace='t'):
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO worker_jobs (namespace, id, status, blob) VALUES (?, ?, ?, ?)",
                   (namespace, job_id, status, blob))


def test_a_planted_record_runs_nothing_and_the_store_still_opens(tmp_path, stores, caplog):
    path, ran = tmp_path/'jobs.db', tmp_path/'ran'
    s, _ = reopen(stores, path)
    s.write([job(1), job(2, metadata={'segment': Segment('hi')})], lambda: None)
    s.close()
    plant(path, 'reduce', pickle.dumps(Planted(f'touch {ran}-reduce'), 5), status='running')
    plant(path, 'global', f"cos\nsystem\n(S'touch {ran}-global'\ntR.".encode())  # protocol 0, by hand
    plant(path, 'eval', pickle.dumps(Planted(f'touch {ran}-eval'), 0).replace(b'posix', b'builtins')
          .replace(b'system', b'eval'))
    with caplog.at_level(logging.ERROR, logger=store_module.__name__):
        s, back = reopen(stores, path, recovery='requeue')
    assert list(tmp_path.glob('ran*')) == []  # nothing ran
    assert [j.id for j in back] == ['j00001']  # j00002 holds a Segment, which is not allowed yet
    assert set(s.unreadable) == {'j00002', 'reduce', 'global', 'eval'}
    assert 'it names posix.system, which the job store does not load' in s.unreadable['reduce']
    assert 'it names os.system' in s.unreadable['global'] and 'builtins.eval' in s.unreadable['eval']
    assert 'Segment' in s.unreadable['j00002'] and 'allowed_classes=' in s.unreadable['j00002']
    assert 'job reduce cannot be read back (UnreadableRecord: it names posix.system' in caplog.text
    s.write([job(3)], lambda: None)  # the store works on
    s.close()
    assert [r[:2] for r in rows(path)] == [('j00001', 'pending'), ('j00002', 'pending'),
                                           ('reduce', 'running'), ('global', 'pending'), ('eval', 'pending'),
                                           ('j00003', 'pending')]
    s, back = reopen(stores, path, allowed_classes=[Segment])  # nothing was lost: allowed, it reads back
    assert [j.id for j in back] == ['j00001', 'j00002', 'j00003']
    assert back[1].metadata == {'segment': Segment('hi')} and list(tmp_path.glob('ran*')) == []


def test_what_a_job_holds_of_the_safe_types_reads_back(tmp_path, stores):
    import datetime, decimal, uuid
    from collections import OrderedDict, deque
    held = {'when': datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc),
            'day': datetime.date(2026, 1, 2),
            'took': datetime.timedelta(seconds=3), 'price': decimal.Decimal('1.10'), 'id': uuid.UUID(int=7),
            'path': Path('/a/b.wav'), 'set': {1, 2}, 'frozen': frozenset({3}), 'bytes': b'x',
            'raw': bytearray(b'y'),
            'complex': 1 + 2j, 'tuple': (1, (2, None)), 'ordered': OrderedDict(a=1), 'deque': deque([1, 2])}
    s, _ = reopen(stores, tmp_path/'j.db')
    s.write([TranscriptionJob('t1', 'whisper', metadata=held)], lambda: None)
    s.close()
    _, back = reopen(stores, tmp_path/'j.db')
    assert back[0].metadata == held and type(back[0]) is TranscriptionJob
