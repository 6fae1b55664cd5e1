"""extensions.metrics: scrapes after a known mix of jobs, histogram buckets, several managers in one registry,
GPU memory on a fake NVML, dropped events, and the core never importing prometheus_client."""
import asyncio, os, subprocess, sys

import pytest
prometheus_client = pytest.importorskip('prometheus_client',
                                        reason="the metrics extra: pip install -e '.[metrics]'")
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cjm_fasthtml_workers.core.config import RestartPolicy
from cjm_fasthtml_workers.extensions.metrics import ManagerCollector
from cjm_fasthtml_workers.extensions.resources import FakeNVML
from helpers import TextJobManager, finish, make, run, until

# the managers here count what happens: no event broadcaster, no streaming, workers always restarted
PLAIN = dict(policy=RestartPolicy.ALWAYS, events=None, streaming=False)

def scrape(registry) -> dict:
    "(name, sorted labels) -> value of every sample, read back with prometheus_client's parser."
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}

def value(samples, name, **labels): return samples.get((name, tuple(sorted(labels.items()))))

def test_known_mix_of_jobs(no_leftover_processes):
    ("3 completed, 2 failed, a crash, a running job and a waiting one cancelled: "
     "each counted where it belongs.")
    async def main():
        m, _ = make(**PLAIN)
        registry = CollectorRegistry()
        registry.register(ManagerCollector(m, nvml=FakeNVML(init_error='no GPU in this test')))
        try:
            for i in range(3): await finish(m, await m.start_job('echo', text=f'{i}'))
            for _ in range(2): await finish(m, await m.start_job('fail', message='boom'))
            crashed = await finish(m, await m.start_job('exit', code=3))
            assert crashed.status == 'failed'
            hang = await m.start_job('hang')
            behind = await m.start_job('echo', text='never')
            await until('the hang job runs', lambda: m.get_job(hang.id).status == 'running')
            s = scrape(registry)
            assert value(s, 'cjm_jobs_running', worker_type='text', plugin='hang') == 1
            assert value(s, 'cjm_jobs_waiting', worker_type='text', plugin='echo') == 1
            assert value(s, 'cjm_workers', worker_type='text', state='busy') == 1
            assert value(s, 'cjm_worker_plugin_loaded', worker_type='text', worker_id='0', plugin='hang',
                         gpu='') == 1
            assert await m.cancel_job(behind.id) and await m.cancel_job(hang.id)
            await until('the cancel counted and the worker idle again',
                        lambda: m.get_workers_info()[0]['cancels'] == 1
                        and m.get_workers_info()[0]['state'] == 'idle')
            assert m.clear_completed_jobs() == 8  # what was counted outlives the jobs
            s = scrape(registry)
        finally: m.shutdown()
        expected = {('echo', 'completed'): 3, ('fail', 'failed'): 2, ('exit', 'failed'): 1,
                    ('hang', 'cancelled'): 1, ('echo', 'cancelled'): 1}
        got = {(dict(k[1])['plugin'], dict(k[1])['status']): v for k, v in s.items()
               if k[0] == 'cjm_jobs_total'}
        assert got == expected
        assert value(s, 'cjm_worker_crashes_total', worker_type='text', worker_id='0') == 1
        assert value(s, 'cjm_worker_cancels_total', worker_type='text', worker_id='0') == 1
        assert value(s, 'cjm_worker_restarts_total', worker_type='text', worker_id='0') == 2
        # started jobs have a wait and a run time; the waiting job cancelled has neither
        assert value(s, 'cjm_job_wait_seconds_count', worker_type='text', plugin='echo') == 3
        assert value(s, 'cjm_job_run_seconds_count', worker_type='text', plugin='hang') == 1
        assert value(s, 'cjm_jobs_waiting', worker_type='text', plugin='echo') == 0
        assert value(s, 'cjm_events_coalesced_total', worker_type='text') == 0
        # one worker: each plugin was loaded when its first job came (the crashed worker's replacement ran
        # only hang)
        for plugin in ('echo', 'fail', 'exit', 'hang'):
            assert value(s, 'cjm_plugin_loads_total', worker_type='text', plugin=plugin) == 1, plugin
        assert not any(k[0].startswith('cjm_worker_gpu_memory') for k in s)  # no GPU: the metric is absent
        assert not any('owner' in dict(k[1]) for k in s)
    run(main())

def test_histogram_buckets_move(no_leftover_processes):
    ("A 1.5 s job moves the run histogram's buckets from le=2.5 up, not below; "
     "a timed reload moves the load one.")
    async def main():
        m, _ = make(**PLAIN)
        registry = CollectorRegistry()
        registry.register(ManagerCollector(m, nvml=FakeNVML(init_error='no GPU')))
        try:
            await finish(m, await m.start_job('sleep', seconds=0.0))
            before = scrape(registry)
            await finish(m, await m.start_job('sleep', seconds=1.5))
            assert await m.reload_plugin('echo', {'load_seconds': 0.3})
            after = scrape(registry)
        finally: m.shutdown()
        run = lambda s, le: value(s, 'cjm_job_run_seconds_bucket', worker_type='text', plugin='sleep', le=le)
        # 1.5 s is above 1.0 (with half a second to spare for a start message read late)
        assert run(after, '1.0') == run(before, '1.0')
        for le in ('2.5', '5.0', '+Inf'): assert run(after, le) == run(before, le) + 1, le
        assert value(after, 'cjm_job_run_seconds_count', worker_type='text', plugin='sleep') == 2
        # the run is measured in the app, from its start's message to its result's: a little under 1.5 s at times
        assert value(after, 'cjm_job_run_seconds_sum', worker_type='text', plugin='sleep') > 1.0
        load = lambda le: value(after, 'cjm_plugin_load_seconds_bucket', worker_type='text', plugin='echo',
                                le=le)
        assert load('0.25') == 0 and load('+Inf') == 1
        assert value(after, 'cjm_plugin_load_seconds_sum', worker_type='text', plugin='echo') >= 0.3
    run(main())

def test_several_managers_in_one_registry(no_leftover_processes):
    "Two managers in one collector: each metric is one family, the managers told apart by worker_type."
    async def main():
        (text, _), (image, _) = make(**PLAIN), make(2, worker_type='image', **PLAIN)
        registry = CollectorRegistry()
        collector = ManagerCollector(text, nvml=FakeNVML(init_error='no GPU'))
        collector.add(image)
        registry.register(collector)
        try:
            await finish(text, await text.start_job('echo', text='a'))
            for _ in range(2): await finish(image, await image.start_job('fail'))
            await image.start()
            output = generate_latest(registry).decode()
            s = scrape(registry)
            with pytest.raises(ValueError, match='Duplicated'):  # a second collector would repeat every name
                registry.register(ManagerCollector(image, nvml=FakeNVML(init_error='no GPU')))
        finally:
            text.shutdown(); image.shutdown()
        assert output.count('# TYPE cjm_jobs_total counter') == 1
        assert value(s, 'cjm_jobs_total', worker_type='text', plugin='echo', status='completed') == 1
        assert value(s, 'cjm_jobs_total', worker_type='image', plugin='fail', status='failed') == 2
        assert value(s, 'cjm_jobs_total', worker_type='image', plugin='echo', status='completed') is None
        assert value(s, 'cjm_workers', worker_type='text', state='idle') == 1
        assert value(s, 'cjm_workers', worker_type='image', state='idle') == 2
    run(main())

def test_gpu_memory_per_worker(no_leftover_processes):
    "On a fake NVML, the GPU memory of each worker's process (and its children) by GPU UUID."
    async def main():
        fake = FakeNVML([FakeNVML.gpu(), FakeNVML.gpu()])
        m, _ = make(2, **PLAIN)
        registry = CollectorRegistry()
        registry.register(ManagerCollector(m, nvml=fake))
        try:
            await m.start()
            pids = [r['pid'] for r in m.get_workers_info()]
            fake.gpus[1]['processes'].update({pids[0]: 3 << 30, 424242: 5 << 30})  # 424242: not the app's
            s = scrape(registry)
        finally: m.shutdown()
        assert value(s, 'cjm_worker_gpu_memory_bytes', worker_type='text', worker_id='0',
                     gpu='GPU-fake-1') == 3 << 30
        assert not [k for k in s if k[0] == 'cjm_worker_gpu_memory_bytes' and ('worker_id', '1') in k[1]]
    run(main())

class SlowBroadcaster:
    async def broadcast(self, event_type, data): await asyncio.sleep(0.05)

class SmallBufferManager(TextJobManager):
    event_buffer_size = 3

def test_events_coalesced(no_leftover_processes):
    "Progress events a slow broadcaster got coalesced are counted, as the manager's public read says."
    async def main():
        m = SmallBufferManager('text', 'test', event_broadcaster=SlowBroadcaster())
        registry = CollectorRegistry()
        registry.register(ManagerCollector(m, nvml=FakeNVML(init_error='no GPU')))
        try:
            await finish(m, await m.start_job('progress', seconds=0.2, steps=100))
            s = scrape(registry)
        finally: m.shutdown()
        assert m.events_coalesced > 0
        assert value(s, 'cjm_events_coalesced_total', worker_type='text') == m.events_coalesced
    run(main())

def test_core_never_imports_prometheus_client():
    "The managers, the FastHTML module and the metrics module's plain reads load without prometheus_client."
    code = ("import sys\nimport cjm_fasthtml_workers.managers.base, "
            "cjm_fasthtml_workers.extensions.fasthtml\n"
            "import cjm_fasthtml_workers.extensions.metrics\nassert 'prometheus_client' not in sys.modules, "
            "'imported'")
    subprocess.run([sys.executable, '-c', code], check=True, timeout=60)

def test_metrics_route_over_http(no_leftover_processes):
    "metrics_route serves the registry's text format; its guard answers 403."
    from fasthtml.common import FastHTML
    from starlette.testclient import TestClient
    from cjm_fasthtml_workers.extensions.fasthtml import metrics_route
    m, _ = make(**PLAIN)
    registry = CollectorRegistry()
    registry.register(ManagerCollector(m, nvml=FakeNVML(init_error='no GPU')))
    app = FastHTML(default_hdrs=False, canonical=False, secret_key='x')
    metrics_route(app, registry=registry, guard=lambda request: request.client.host == 'testclient')
    metrics_route(app, path='/closed', registry=registry, guard=lambda request: False)
    try:
        with TestClient(app) as client:
            r = client.get('/metrics')
            assert r.status_code == 200 and r.headers['content-type'] == prometheus_client.CONTENT_TYPE_LATEST
            assert 'cjm_workers{state="not started",worker_type="text"} 1.0' in r.text
            assert client.get('/closed').status_code == 403
    finally: m.shutdown()
