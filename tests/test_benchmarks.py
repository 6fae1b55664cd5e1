"benchmarks/run.py keeps working: a quick run exits 0 and reports every shape with numbers. No timing is asserted."
import json, math, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# issue 6's table, one id per row
SHAPES = ['latency_median', 'latency_p99', 'throughput', 'stall_submissions', 'stall_cancel', 'stall_reload', 'stall_unload',
          'cold_start', 'cancel_to_ready', 'crash_detection', 'shutdown_idle', 'payload_1mb', 'payload_10mb',
          'memory_kept', 'memory_cleared']

def number(x) -> bool: return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

def test_quick_run(no_leftover_processes, tmp_path):
    out = tmp_path / 'bench.json'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'run.py'), '--quick', '--json', str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result['shapes']) == set(SHAPES)
    for shape_id, row in result['shapes'].items():
        assert row['title'] in proc.stdout, f"{shape_id} is missing from the printed table"
        assert number(row['library']['median']) and number(row['floor']['median']), shape_id
        assert row['met'] in (True, False, None), shape_id
        if 'ratio' in row: assert number(row['ratio']['median']), shape_id
    for shape_id in ('latency_median', 'throughput', 'payload_1mb', 'payload_10mb'):  # the mp.Pipe floor too
        assert number(result['shapes'][shape_id]['pipe']['median']), shape_id
    assert result['machine']['cores'] and result['machine']['python'] and result['machine']['cpu']
