"""The transport seam: both backends implement `backends.transport.Transport` in full (no member probed for,
no member missing), the package has no import cycle (the backends never import a manager), and no module of
the wire or the backends imports another module's private name."""
import ast, pathlib

import pytest

import cjm_fasthtml_workers
from cjm_fasthtml_workers.backends.process import ProcessWorker
from cjm_fasthtml_workers.backends.transport import Transport, missing_members, transport_members
from cjm_fasthtml_workers.testing import scenario_worker_process

PACKAGE = pathlib.Path(cjm_fasthtml_workers.__file__).parent

def test_process_worker_is_a_transport():
    w = ProcessWorker(scenario_worker_process, 'unstarted')
    assert missing_members(w) == [] and isinstance(w, Transport)
    assert (w.placement(), w.exit_reason, w.pid, w.death_fd, w.write_fd) == ({}, None, None, None, None)

def test_ray_worker_is_a_transport():
    pytest.importorskip('ray', reason="the Ray backend needs ray: pip install -e '.[ray]'")
    from cjm_fasthtml_workers.backends.ray import RayWorker
    w = RayWorker(scenario_worker_process, 'unstarted')  # nothing starts: Ray is not asked
    assert missing_members(w) == [] and isinstance(w, Transport)
    assert (w.placement(), w.exit_reason, w.write_fd, w.wants_write()) == ({}, None, None, False)

def test_missing_members_names_what_lacks():
    class Half:
        name, pid = 'half', None
        def start(self): return 1
        def reap(self, seconds=1.0): return None  # the supervisor calls reap(timeout=...)
    missing = missing_members(Half())
    assert 'send' in missing and 'reap(seconds=1.0)' in missing and 'start' not in missing
    assert len(transport_members()) == 22

def _imports(path: pathlib.Path) -> list: # (module imported, names), relative imports resolved
    parts, out = list(path.relative_to(PACKAGE.parent).with_suffix('').parts), []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level] if node.level else []
            module = '.'.join(base + ([node.module] if node.module else []))
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import): out += [(a.name, []) for a in node.names]
    return out

def test_backends_never_import_a_manager():
    "The one import cycle (ray -> managers.base -> ray, lazy) is gone: a backend needs no manager module."
    for path in sorted((PACKAGE / 'backends').glob('*.py')) + sorted((PACKAGE / 'core').glob('*.py')):
        bad = [m for m, _ in _imports(path) if m.startswith('cjm_fasthtml_workers.managers')]
        assert not bad, f"{path.name} imports {bad}"

@pytest.mark.parametrize('folder', ['core', 'backends'])
def test_no_private_name_crosses_a_module_line(folder):
    for path in sorted((PACKAGE / folder).glob('*.py')):
        for module, names in _imports(path):
            if not module.startswith('cjm_fasthtml_workers'): continue
            private = [n for n in names if n.startswith('_')]
            assert not private, f"{path.name} imports {private} from {module}"
