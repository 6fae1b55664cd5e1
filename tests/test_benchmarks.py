("benchmarks/run.py keeps working: a quick run exits 0 and reports every shape with numbers. "
 "No timing is asserted.")
import json, math, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# issue 6's table, then issue 10's rows (ProcessPoolExecutor, the pool, affinity), one id per row
SHAPES = ['latency_median', 'latency_p99', 'throughput', 'throughput_ppe', 'stall_submissions', 'stall_burst',
          'event_rate', 'stall_cancel', 'stall_reload', 'stall_unload', 'cold_start', 'cancel_to_ready',
          'crash_detection', 'shutdown_idle', 'payload_1mb', 'payload_10mb', 'payload_200mb',
          'stall_payload_200mb',
          'memory_kept', 'memory_cleared', 'pool_start', 'pool_job_n1', 'pool_speedup_2', 'pool_speedup_4',
          'affinity_loads', 'affinity_loads_at_once']
NO_FLOOR = {'throughput_ppe', 'stall_burst', 'event_rate', 'pool_job_n1', 'pool_speedup_2', 'pool_speedup_4',
            'affinity_loads_at_once'}
PIPE = ('latency_median', 'throughput', 'payload_1mb', 'payload_10mb')  # the mp.Pipe floor too
PPE = ('latency_median', 'latency_p99', 'throughput', 'throughput_ppe')  # ProcessPoolExecutor(1) too
POSITIVE = ('pool_start', 'pool_job_n1', 'pool_speedup_2', 'pool_speedup_4', 'affinity_loads',
            'affinity_loads_at_once')

def number(x) -> bool: return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

def test_quick_run(no_leftover_processes, tmp_path):
    out = tmp_path / 'bench.json'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'run.py'), '--quick', '--json',
                           str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result['shapes']) == SHAPES
    for shape_id, row in result['shapes'].items():
        assert row['title'] in proc.stdout, f"{shape_id} is missing from the printed table"
        assert number(row['library']['median']), shape_id
        assert ('floor' in row) == (shape_id not in NO_FLOOR), shape_id
        for side in ('floor', 'pipe', 'ppe'):
            if side in row: assert number(row[side]['median']), (shape_id, side)
        assert row['met'] in (True, False, None), shape_id
        if 'ratio' in row: assert number(row['ratio']['median']) and row['ratio']['median'] > 0, shape_id
    for shape_id in PIPE: assert number(result['shapes'][shape_id]['pipe']['median']), shape_id
    for shape_id in PPE: assert number(result['shapes'][shape_id]['ppe']['median']), shape_id
    for shape_id in POSITIVE: assert result['shapes'][shape_id]['library']['median'] > 0, shape_id
    assert 'PPE(1)' in proc.stdout.splitlines()[0]  # its own column
    assert result['shapes']['throughput_ppe']['target'].endswith('PPE(1)')
    assert result['machine']['cores'] and result['machine']['python'] and result['machine']['cpu']
