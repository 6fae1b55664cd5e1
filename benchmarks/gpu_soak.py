"""GPU memory on a real NVIDIA GPU (issue 21's "where a GPU machine is lent"): not collected by pytest.

    python benchmarks/gpu_soak.py [--jobs 400] [--keep-alive 3]

1. Soak: 4 plugins, each allocating (torch) a block of CUDA memory while it is loaded, whose needs add up to about
   twice the GPUs' memory, run `--jobs` tiny jobs in a mixed order on 2 workers per GPU. The manager must never let
   a load overcommit a GPU: the summary counts CUDA out-of-memory errors (0 expected).
2. Idle exit: one worker, `idle_unload='exit'`, `keep_alive_seconds=K`: after its job, the worker's NVML memory
   must be back to 0 within K + 2 s.
It prints a summary and exits 0 when both hold, 1 otherwise (2: no GPU, torch or pynvml). Needs torch and
nvidia-ml-py (pynvml); runs in well under 5 minutes on one H100. Importing it does nothing."""
import argparse, asyncio, os, sys, time, uuid
from dataclasses import dataclass, field
from typing import Any, Dict

from cjm_fasthtml_workers.core.config import PluginPolicy, WorkerConfig
from cjm_fasthtml_workers.core.worker import base_worker_process
from cjm_fasthtml_workers.managers.base import BaseJob, BaseJobManager

PLUGINS = ['m0', 'm1', 'm2', 'm3']
SIZE_ENV = 'GPU_SOAK_MIB'  # MiB each plugin allocates, set by the app before its workers start
CONTEXT_MIB = 700  # a CUDA context and PyTorch's own, roughly; counted in each declared need

# ----- the workers' side (spawned workers import this module by name) -------------------------------------------
class SoakPlugins:
    "Plugins m0..m3: each holds a CUDA block of $GPU_SOAK_MIB MiB while loaded; a job touches it."
    def __init__(self): self.blocks: Dict[str, Any] = {}
    def discover_plugins(self): return [{'name': n} for n in PLUGINS]
    def load_plugin(self, plugin_data, config): self._load(plugin_data['name'])
    def reload_plugin(self, plugin_name, config=None):
        if config is None: return self.unload_plugin(plugin_name)
        self._load(plugin_name)
    def _load(self, name):
        import torch
        if name in self.blocks: return
        try: self.blocks[name] = torch.empty(int(os.environ[SIZE_ENV]) << 20, dtype=torch.uint8, device='cuda')
        except torch.cuda.OutOfMemoryError as e: raise RuntimeError(f"CUDA out of memory loading {name}: {e}") from e
    def unload_plugin(self, plugin_name):
        import torch
        if self.blocks.pop(plugin_name, None) is not None: torch.cuda.empty_cache()
    def execute_plugin(self, plugin_name, **params):
        block = self.blocks[plugin_name]
        block[:1024].fill_(1)
        return {'pid': os.getpid(), 'sum': int(block[:1024].sum().item())}
    def check_streaming_support(self, plugin_name): return False

def soak_worker(request_queue, result_queue, response_queue):
    base_worker_process(request_queue, result_queue, response_queue, SoakPlugins)

# ----- the app's side ---------------------------------------------------------------------------------------------
@dataclass
class SoakJob(BaseJob):
    params: Dict[str, Any] = field(default_factory=dict)

class SoakManager(BaseJobManager[SoakJob]):
    def create_job(self, plugin_id, **kw): return SoakJob(id=uuid.uuid4().hex, plugin_id=plugin_id, params=kw)
    def get_worker_entry_point(self): return soak_worker
    def prepare_execute_request(self, job): return job.params
    def extract_job_result(self, job, data): return data

class Events:
    def __init__(self): self.events = []
    async def broadcast(self, kind, data): self.events.append((kind, data))
    def of(self, suffix): return [d for k, d in self.events if k.endswith(':' + suffix)]

def _is_oom(error) -> bool: return bool(error) and 'out of memory' in error.lower()

async def soak(rm, n_jobs:int) -> dict:
    "The soak: returns what the summary prints."
    gpus = rm.get_gpu_info()
    smallest = min(d.memory_total for d in gpus) >> 20
    total = sum(d.memory_total for d in gpus) >> 20
    size = int(total * 2 / len(PLUGINS)) - CONTEXT_MIB  # the needs add up to about 2x the GPUs' memory
    size = min(size, smallest - CONTEXT_MIB - 1024)  # each must fit one GPU with its context and the margin
    os.environ[SIZE_ENV] = str(size)
    events = Events()
    cfg = WorkerConfig(max_workers=2 * len(gpus), gpus='auto', workers_per_gpu=2, gpu_memory_margin_mb=512,
                       worker_start_timeout_seconds=120, reload_timeout_seconds=120,
                       plugin_policies={p: PluginPolicy(gpu_memory_mb=size + CONTEXT_MIB) for p in PLUGINS})
    m = SoakManager('soak', 'soak', worker_config=cfg, resource_manager=rm, event_broadcaster=events)
    t0 = time.monotonic()
    try:
        await m.start()
        order = [PLUGINS[(i * 7 + i // 13) % len(PLUGINS)] for i in range(n_jobs)]
        jobs = [await m.start_job(p) for p in order]
        done = [await m.wait_for_job(j.id, timeout=240) for j in jobs]
    finally: await asyncio.to_thread(m.shutdown)
    return dict(gpus=[f"{d.name} {d.memory_total >> 20} MiB" for d in gpus], plugin_mib=size,
                needs_x=round(len(PLUGINS) * (size + CONTEXT_MIB) / total, 2), jobs=n_jobs,
                completed=sum(j.status == 'completed' for j in done), ooms=sum(_is_oom(j.error) for j in done),
                other_failures=[j.error for j in done if j.status != 'completed' and not _is_oom(j.error)][:3],
                evictions=sum(d['reason'] == 'memory' for d in events.of('plugin_unloaded')),
                seconds=round(time.monotonic() - t0, 1))

async def idle_exit(rm, keep_alive:float) -> dict:
    "One worker, idle_unload='exit': seconds from its job's end until NVML shows none of its memory."
    os.environ[SIZE_ENV] = '1024'
    cfg = WorkerConfig(max_workers=1, gpus='auto', keep_alive_seconds=keep_alive, idle_unload='exit',
                       worker_start_timeout_seconds=120)
    m = SoakManager('exit', 'soak', worker_config=cfg, resource_manager=rm)
    try:
        job = await m.wait_for_job((await m.start_job('m0')).id, timeout=120)
        ended, pid = time.monotonic(), job.worker_pid
        held = lambda: sum(p.used_memory or 0 for d in rm.get_gpu_info() for p in d.processes if p.pid == pid)
        seen = held()
        while held() and time.monotonic() - ended < keep_alive + 10: await asyncio.sleep(0.05)
        back = time.monotonic() - ended if not held() else None
    finally: await asyncio.to_thread(m.shutdown)
    return dict(status=job.status, held_mib_after_job=seen >> 20, back_after_s=None if back is None else round(back, 2),
                limit_s=keep_alive + 2)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--jobs', type=int, default=400)
    ap.add_argument('--keep-alive', type=float, default=3.0)
    args = ap.parse_args(argv)
    try:
        import torch, pynvml  # noqa: F401
        from cjm_fasthtml_workers.extensions.resources import ResourceManager
        rm = ResourceManager()
        if not rm.gpu_available: raise RuntimeError(rm.gpu_unavailable_reason)
    except Exception as e:
        print(f"GPU CHECK NOT RUN: {type(e).__name__}: {e}")
        return 2
    s = asyncio.run(soak(rm, args.jobs))
    e = asyncio.run(idle_exit(rm, args.keep_alive))
    soak_ok = s['completed'] == s['jobs'] and s['ooms'] == 0
    exit_ok = e['status'] == 'completed' and e['back_after_s'] is not None and e['back_after_s'] <= e['limit_s']
    print("=== GPU memory check (issue 21) ===")
    print(f"GPUs: {', '.join(s['gpus'])}")
    print(f"soak: {s['jobs']} jobs over {len(PLUGINS)} plugins of {s['plugin_mib']} MiB (needs = {s['needs_x']}x "
          f"the GPUs' memory): {s['completed']} completed, {s['ooms']} CUDA out-of-memory, {s['evictions']} "
          f"evictions, {s['seconds']} s; other failures: {s['other_failures'] or 'none'} -> {'PASS' if soak_ok else 'FAIL'}")
    print(f"idle exit: job {e['status']}, worker held {e['held_mib_after_job']} MiB, NVML memory back after "
          f"{e['back_after_s']} s (limit {e['limit_s']} s) -> {'PASS' if exit_ok else 'FAIL'}")
    print("RESULT:", 'PASS' if soak_ok and exit_ok else 'FAIL')
    return 0 if soak_ok and exit_ok else 1

if __name__ == '__main__': sys.exit(main())
