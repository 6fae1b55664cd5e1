("End to end on a real NVIDIA GPU: the manager's worker and a server it spawned are the app's; "
 "another process is not.")
import subprocess, sys
import pytest

from cjm_fasthtml_workers.core.config import WorkerConfig
from cjm_fasthtml_workers.extensions.resources import ResourceManager, ResourceStatus
from helpers import TextJobManager, finish, run, until
from conftest import pid_gone

pytestmark = pytest.mark.gpu

def _require_gpu_and_torch() -> ResourceManager:
    rm = ResourceManager(gpu_memory_threshold_percent=45.0)
    if not rm.gpu_available: pytest.skip(f"no NVIDIA GPU/driver: {rm.gpu_unavailable_reason}")
    try: import torch  # noqa: F401  (the plugins allocate through PyTorch)
    except ImportError: pytest.skip("PyTorch is not installed: the GPU plugins allocate CUDA memory with it")
    return rm

def _gpu_pids(rm) -> set: return {p.pid for d in rm.get_gpu_info() for p in d.processes}

def test_worker_and_its_server_count_as_the_app(no_leftover_processes):
    rm = _require_gpu_and_torch()
    async def main():
        m = TextJobManager('gpu', 'test', resource_manager=rm,
                           worker_config=WorkerConfig(worker_start_timeout_seconds=120))
        outsider = None
        try:
            held = await finish(m, await m.start_job('gpu', mib=1024), timeout=120)
            assert held.status == 'completed', held.error
            server = await finish(m, await m.start_job('gpu_server', mib=512), timeout=120)
            worker_pid, server_pid = held.result['pid'], server.result['pid']
            await until('the worker and its server on the GPU',
                        lambda: {worker_pid, server_pid} <= _gpu_pids(rm),
                        timeout=120)
            c = rm.check_gpu_availability(0)
            assert worker_pid in c.app_pids and server_pid in c.app_pids, (c.app_pids, c.external_pids)
            assert c.status == ResourceStatus.APP_BUSY, c.message
            total = rm.get_gpu_info()[0].memory_total
            mib = int(total * 0.55) >> 20  # more than the 45 % threshold, outside the app
            outsider = subprocess.Popen([sys.executable, '-c',
                f"import time, torch; x = torch.empty({mib << 20}, dtype=torch.uint8, device='cuda'); "
                f"time.sleep(600)"])
            # NVML lists the process with its context first, its allocation a moment later
            def outsider_memory():
                return sum(p.used_memory or 0 for d in rm.get_gpu_info() for p in d.processes
                           if p.pid == outsider.pid)
            await until("the outsider's memory on the GPU",
                        lambda: outsider_memory() > total * 0.5, timeout=120)
            c = rm.check_gpu_availability(0)
            assert outsider.pid in c.external_pids and outsider.pid not in c.app_pids
            assert c.status == ResourceStatus.EXTERNAL_BUSY, c.message
            print(f"\n{c.message}\napp: {c.app_pids} external: {c.external_pids}")
        finally:
            m.shutdown()
            if outsider is not None: outsider.kill(); outsider.wait()
        assert pid_gone(server_pid), "the worker's GPU server outlived shutdown"
        assert rm.get_workers_by_type('gpu') == []
    run(main(), 110)  # its waits add up to more than run's default
