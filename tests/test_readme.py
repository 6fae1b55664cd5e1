"""Every python block of README.md runs as written, imports included: on its own, or added to the end of the
block its first line continues (`# continues quickstart.py`). A block whose first line names it
(`# my_workers.py`) is also saved under that name beside the others, so that a later block can import it.

Each block runs in a fresh subprocess, in a temporary directory, with a time limit, with every network
connection but loopback refused. Where a block says what a `print` prints (a comment on its line), the output
must hold it. A block that serves an app (`serve()`) is imported, not run: serve() starts a server only in the
main script, and the app's page is asked for with Starlette's TestClient (tests/test_fasthtml.py runs that app
under real servers). The store quickstart runs twice, stopped with Ctrl-C while its sleep job runs, as the
README says to.
Shell blocks are not run; their `pip install` lines must work from the clone (the package is not published).
CJM_README names another markdown file to check instead of README.md."""
import os, re, signal, subprocess, sys, textwrap, time, tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from helpers import Lines

ROOT = Path(__file__).resolve().parents[1]
README = Path(os.environ.get('CJM_README', ROOT/'README.md'))
TIMEOUT = 60  # seconds for one run of a block; each takes a few

@dataclass
class Block:
    lang: str  # 'python', 'bash', ...
    code: str
    line: int  # where it starts in the README
    name: Optional[str] = None  # from a first line '# name.py'
    continues: Optional[str] = None  # from a first line '# continues name.py'

    @property
    def label(self) -> str: return f"{self.name or 'block'}@{self.line}"

def parse(text:str) -> list:
    "The fenced code blocks of a markdown text, in order."
    out = []
    for m in re.finditer(r'^```(\w*)\n(.*?)^```$', text, re.S | re.M):
        first = m.group(2).split('\n', 1)[0].strip()
        named = re.fullmatch(r'#\s*([\w.-]+\.py)', first)
        cont = re.fullmatch(r'#\s*continues\s+([\w.-]+\.py)', first)
        out.append(Block(m.group(1), m.group(2), text.count('\n', 0, m.start()) + 1,
                         named.group(1) if named else None, cont.group(1) if cont else None))
    return out

BLOCKS = parse(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang == 'python']
NAMED = {b.name: b for b in PYTHON if b.name}

def chain(block:Block) -> str:
    "The script a block makes: the blocks it continues, then itself."
    parts, b = [block.code], block
    while b.continues:
        assert b.continues in NAMED, f"{b.label} continues {b.continues}, which names no block of the README"
        b = NAMED[b.continues]
        parts.insert(0, b.code)
    return '\n'.join(parts)

def expected(script:str) -> list:
    "What the script's `print` lines say they print: the comment at the end of each."
    return [m.group(1).strip() for m in re.finditer(r'^.*\bprint\(.*\)\s+#\s*(.+)$', script, re.M)]

# a site-wide guard, on PYTHONPATH for the block and the workers it spawns: only loopback and local sockets
GUARD = '''
import socket
_LOCAL = ('localhost', '127.0.0.1', '::1', '0.0.0.0', '', None)
def _check(address):
    if isinstance(address, tuple) and address[0] not in _LOCAL:
        raise OSError(f"the README test allows no network: {address!r}")
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
socket.socket.connect = lambda self, address: (_check(address), _connect(self, address))[1]
socket.socket.connect_ex = lambda self, address: (_check(address), _connect_ex(self, address))[1]
socket.getaddrinfo = lambda host, *a, **k: (_check((host,)), _getaddrinfo(host, *a, **k))[1]
'''

def workdir(tmp_path:Path) -> Path:
    "A directory holding every named block (so that they can import each other) and the network guard."
    for name, b in NAMED.items(): (tmp_path/name).write_text(b.code)
    (tmp_path/'guard').mkdir()
    (tmp_path/'guard'/'sitecustomize.py').write_text(GUARD)
    return tmp_path

def env(cwd:Path) -> dict:
    path = os.pathsep.join([str(cwd/'guard'), str(ROOT), os.environ.get('PYTHONPATH', '')])
    return {**os.environ, 'PYTHONPATH': path, 'PYTHONUNBUFFERED': '1', 'PYTHONDONTWRITEBYTECODE': '1'}

def run(cmd:list, cwd:Path) -> subprocess.CompletedProcess:
    try: return subprocess.run(cmd, cwd=cwd, env=env(cwd), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{cmd} ran past {TIMEOUT} s:\n{e.stdout}\n{e.stderr}") from None

def check(p:subprocess.CompletedProcess, label:str, script:str):
    "The run ended well and printed what the script says it prints."
    assert p.returncode == 0, f"{label} exited with {p.returncode}:\n{p.stdout}\n{p.stderr}"
    for want in expected(script):
        assert want in p.stdout, f"{label} did not print {want!r}:\n{p.stdout}\n{p.stderr}"

# ----- the blocks ----------------------------------------------------------------------------------------
def test_the_guard_refuses_the_network(tmp_path):
    "What the blocks run under: a connection to anything but loopback fails."
    cwd = workdir(tmp_path)
    connect = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=1)"
    p = run([sys.executable, '-c', connect], cwd)
    assert p.returncode != 0 and 'allows no network' in p.stderr, p.stderr

def test_the_readme_has_its_blocks():
    "The parse finds what the README holds, so the tests below cannot pass by finding nothing."
    assert {'quickstart.py', 'my_workers.py', 'app.py', 'store_quickstart.py'} <= set(NAMED), list(NAMED)
    assert len(PYTHON) >= 8 and any(b.continues for b in PYTHON), [b.label for b in PYTHON]
    assert "completed {'text': 'hi', 'params': {}}" in expected(NAMED['quickstart.py'].code)

def test_no_top_level_await():
    "A block is a script: an `await` outside a function does not run."
    for b in PYTHON:
        compile(chain(b), b.label, 'exec')  # a SyntaxError names the block

SERVED = [b for b in PYTHON if re.search(r'^serve\(', chain(b), re.M)]  # a continuation of a served app too
STOPPED = {'store_quickstart.py'}  # run twice, stopped in between, below
PLAIN = [b for b in PYTHON if b not in SERVED and b.name not in STOPPED]

@pytest.mark.parametrize('block', PLAIN, ids=lambda b: b.label)
def test_block_runs(block, tmp_path, no_leftover_processes):
    cwd = workdir(tmp_path)
    script = chain(block)
    (cwd/'block_main.py').write_text(script)
    check(run([sys.executable, 'block_main.py'], cwd), block.label, script)

@pytest.mark.parametrize('block', SERVED, ids=lambda b: b.label)
def test_served_app_imports_and_answers(block, tmp_path, no_leftover_processes):
    "The app is made (imports, manager, routes) and its page answers; its lifespan (the workers) is not run."
    cwd = workdir(tmp_path)
    (cwd/'served_app.py').write_text(chain(block))
    probe = textwrap.dedent('''
        from starlette.testclient import TestClient
        import served_app
        r = TestClient(served_app.app).get('/')
        assert r.status_code == 200 and '<title>' in r.text, (r.status_code, r.text[:500])
        print('page ok')''')
    p = run([sys.executable, '-c', probe], cwd)
    assert p.returncode == 0 and 'page ok' in p.stdout, f"{block.label}:\n{p.stdout}\n{p.stderr}"

def _second_run_prints() -> list:
    "What the README says the store quickstart's second run prints."
    m = re.search(r'The second run prints (.*?)\n\n', README.read_text(), re.S)
    assert m, "the README no longer says what the store quickstart's second run prints"
    return re.findall(r'`([^`]+)`', m.group(1))

def test_lines_that_arrive_together_are_each_read_at_once(no_leftover_processes):
    ("Two lines in one write are both read at once, not the second when the child next writes or exits "
     "(select() then readline() read the second only then: the store quickstart's test waited 30 s).")
    both = "import sys, time; sys.stdout.write('completed\\nstop now\\n'); sys.stdout.flush(); time.sleep(60)"
    child = subprocess.Popen([sys.executable, '-c', both], stdout=subprocess.PIPE, text=True)
    try:
        lines = Lines(child.stdout)
        assert [lines.next(30), lines.next(30)] == ['completed\n', 'stop now\n']
        assert child.poll() is None  # read while the child still runs, not at its exit
        with pytest.raises(TimeoutError): lines.next(0.1)
    finally:
        child.kill(); child.wait(); child.stdout.close()

def test_store_quickstart_stopped_and_run_again(tmp_path, no_leftover_processes):
    "Run, stopped with Ctrl-C when it says so (its sleep job running), run again: it prints what it kept."
    block = NAMED['store_quickstart.py']
    cwd = workdir(tmp_path)
    first = subprocess.Popen([sys.executable, block.name], cwd=cwd, env=env(cwd), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,  # Ctrl-C works where this shell ignores it
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out, lines, deadline = [], Lines(first.stdout), time.monotonic() + TIMEOUT
    try:
        while not (out and 'stop this app now' in out[-1]):
            try: line = lines.next(max(0.0, deadline - time.monotonic()))
            except TimeoutError: line = ''
            assert line, f"the first run did not say when to stop it: {out}"
            out.append(line)
        first.send_signal(signal.SIGINT)
        first.wait(20)
    finally:
        if first.poll() is None: first.kill(); first.wait()
        first.stdout.close(); first.stderr.close()
    assert [l.strip() for l in out] == ['completed', out[-1].strip()], out  # nothing kept yet; the echo job
    second = run([sys.executable, block.name], cwd)
    check(second, 'the second run of store_quickstart.py', '')
    said = _second_run_prints()
    assert len(said) == 2 and all(s.startswith('kept: ') for s in said), said
    assert second.stdout.splitlines() == said, second.stdout

# ----- the shell blocks: pip from the clone ---------------------------------------------------------------
def test_install_lines_work_from_the_clone():
    "Every `pip install` installs the clone (`-e .` or `-e '.[extra]'`) with extras the package has."
    extras = set(tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['optional-dependencies'])
    shell = [b for b in BLOCKS if b.lang in ('bash', 'sh', '')]
    lines = [l for b in shell for l in b.code.splitlines() if 'pip install' in l]
    lines += re.findall(r'`([^`]*pip install[^`]*)`', README.read_text())  # in the prose too
    assert lines
    for line in lines:
        for target in re.findall(r'pip install\s+(.*?)(?:\s*(?:#|&&|$))', line):
            m = re.fullmatch(r"-e\s+'?\.(?:\[([\w,]+)\])?'?", target.strip())
            assert m, f"not an install from the clone (the package is not published): {line!r}"
            assert set(filter(None, (m.group(1) or '').split(','))) <= extras, (line, extras)
