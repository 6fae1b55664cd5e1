"""A user of the documented system: code written only against the spec (../shared/spec), in the style of its
examples, must keep working on this library (issue 9).

The pieces are what an app built on the documented system has: a `MyJob`/`MyJobManager` pair like the spec's
usage example, a plugin registry whose metadata is identified by `get_unique_id()`, a plugin manager written
to the `PluginManagerAdapter` protocol and run by `base_worker_process`, a second worker written by hand to
the documented wire protocol only (plain dicts, flat EXECUTE, no job-started message, answers without request
ids), and a broadcaster like the spec's `SimpleEventBroadcaster` that shortens every job id it is given.
Worker entry points are module-level: the manager spawns them, and the child imports this module."""
import asyncio, inspect, subprocess, sys, time, uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional

import pytest

from cjm_fasthtml_workers.core.adapters import create_simple_adapter
from cjm_fasthtml_workers.core.config import WorkerConfig
from cjm_fasthtml_workers.core.protocol import WorkerResult, WorkerStreamChunk
from cjm_fasthtml_workers.core.worker import base_worker_process
from cjm_fasthtml_workers.managers.base import BaseJob, BaseJobManager
from helpers import finish, run, until

JOB_TIMEOUT = 30  # seconds a job may take before the test fails instead of hanging
CATEGORY = 'compat'
JOB_EVENTS = {'submitted', 'started', 'completed', 'failed', 'cancelled', 'chunk', 'progress'}

# ----- plugin registry ----------------------------------------------------------------------------
@dataclass
class PluginMeta:
    "Plugin metadata as a registry of the documented system keeps it: identified by `get_unique_id()`."
    name: str
    category: str
    supports_streaming: bool = False
    def get_unique_id(self) -> str: return f"{self.category}_{self.name}"

PLUGINS = ['echo', 'stream', 'fail', 'sleep', 'history', 'progress', 'shout']
META = {n: PluginMeta(n, CATEGORY, supports_streaming=(n == 'stream')) for n in PLUGINS}
ID = {n: m.get_unique_id() for n, m in META.items()}  # plugin name -> plugin id
CONFIGS = {ID['echo']: {'model_id': 'echo-model-v1', 'prefix': '>> '},
           **{ID[n]: {'model_id': f'{n}-model-v1'} for n in PLUGINS if n != 'echo'}}

class CompatRegistry:
    ("A plugin registry like the spec's SimplePluginRegistry; it records which ids configurations are asked "
     "for.")
    def __init__(self): self.config_requests = []
    def get_plugins_by_category(self, category): return [m for m in META.values() if m.category == category]
    def get_plugin(self, plugin_id): return next((m for m in META.values() if m.get_unique_id() == plugin_id),
                                                 None)
    def load_plugin_config(self, plugin_id):
        self.config_requests.append(plugin_id)
        return dict(CONFIGS.get(plugin_id, {}))

# ----- plugin manager (runs in the worker) --------------------------------------------------------
class CompatPluginManager:
    "A plugin manager written to the documented PluginManagerAdapter protocol; it records what it is asked."
    def __init__(self): self.loaded, self.calls = {}, []
    def discover_plugins(self) -> list: return [PluginMeta(n, CATEGORY) for n in PLUGINS]

    def load_plugin(self, plugin_data, config):
        self.calls.append(('load', plugin_data.name, dict(config or {})))
        self.loaded[plugin_data.name] = dict(config or {})

    def reload_plugin(self, plugin_name, config=None):
        self.calls.append(('reload', plugin_name, config))
        if config is None: return self.unload_plugin(plugin_name)
        if config.get('fail_reload'): raise RuntimeError(f"{plugin_name} refused to reload")
        self.loaded[plugin_name] = dict(config)

    def unload_plugin(self, plugin_name):
        self.calls.append(('unload', plugin_name, None))
        self.loaded.pop(plugin_name, None)

    def check_streaming_support(self, plugin_name) -> bool: return plugin_name == 'stream'

    def execute_plugin_stream(self, plugin_name, text='', **params) -> Iterator[str]:
        words = text.split(' ')
        for i, w in enumerate(words): yield w if i == len(words) - 1 else w + ' '

    def execute_plugin(self, plugin_name, **params):
        if plugin_name == 'echo': return {'config': self.loaded.get('echo'), 'kwargs': params}
        if plugin_name == 'stream':
            return {'text': ''.join(self.execute_plugin_stream('stream', **params)), 'via': 'execute_plugin'}
        if plugin_name == 'fail': raise ValueError(params.get('message', 'bad value'))
        if plugin_name == 'sleep':
            time.sleep(params.get('seconds', 0))
            return {'slept': params.get('seconds', 0)}
        if plugin_name == 'history': return {'calls': list(self.calls)}
        if plugin_name == 'progress':
            from cjm_fasthtml_workers.core.worker import report_progress  # this project's progress reporting
            report_progress(0.5, 'half way')
            return {'done': True}
        if plugin_name == 'shout': return params.get('text', '').upper()  # not a dict, on purpose
        raise ValueError(f"unknown plugin {plugin_name!r}")

# ----- worker entry points ------------------------------------------------------------------------
def compat_worker_process(request_queue, result_queue, response_queue):
    "The library's generic worker over CompatPluginManager, streaming on."
    base_worker_process(request_queue, result_queue, response_queue, CompatPluginManager,
                        supports_streaming=True)

def compat_worker_process_no_streaming(request_queue, result_queue, response_queue):
    "The library's generic worker over CompatPluginManager, streaming off."
    base_worker_process(request_queue, result_queue, response_queue, CompatPluginManager,
                        supports_streaming=False)

def documented_system_worker(request_queue, result_queue, response_queue):
    ("A worker written by hand to the documented wire protocol only: plain dicts, flat EXECUTE, "
     "no job_started.")
    plugin_manager, configs, current = None, {}, None
    while True:
        request = request_queue.get()
        kind = request.get('type')
        if kind == 'init':
            plugin_manager, configs = CompatPluginManager(), dict(request.get('plugin_configs') or {})
            for plugin in plugin_manager.discover_plugins():
                if plugin.name in configs: plugin_manager.load_plugin(plugin, configs[plugin.name])
            result_queue.put({'type': 'ready'})
        elif kind == 'execute':
            job_id, current = request['job_id'], request['plugin_name']
            params = {k: v for k, v in request.items() if k not in ('type', 'job_id', 'plugin_name')}
            try:
                data = plugin_manager.execute_plugin(current, **params)
                result_queue.put({'type': 'result', 'job_id': job_id, 'status': 'success', 'data': data})
            except Exception as e:
                result_queue.put({'type': 'result', 'job_id': job_id, 'status': 'error', 'error': str(e)})
        elif kind in ('reload', 'unload'):
            name = request['plugin_name']
            try:
                if kind == 'reload':
                    plugin_manager.reload_plugin(name, request.get('config'))
                    configs[name] = request.get('config')
                else: plugin_manager.unload_plugin(name)
                response_queue.put({'type': 'response', 'request_type': kind, 'status': 'success'})
            except Exception as e:
                response_queue.put({'type': 'response', 'request_type': kind, 'status': 'error',
                                    'error': str(e)})
        elif kind == 'get_state':
            response_queue.put({'type': 'state', 'current_plugin': current,
                                'current_config': configs.get(current),
                                'loaded_plugins': list(plugin_manager.loaded) if plugin_manager else []})
        elif kind == 'stop': return

# ----- the manager, like the spec's usage example -------------------------------------------------
@dataclass
class MyJob(BaseJob):
    "Custom job type with domain-specific fields."
    input_text: str = ""
    stream: bool = False
    options: Dict[str, Any] = field(default_factory=dict)

class MyJobManager(BaseJobManager[MyJob]):
    "Concrete job manager implementation; its documented hooks record what they are given."
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.validation_calls, self.resource_id_configs, self.completed_hook_calls = [], [], []
        self.validation_error: Optional[str] = None

    def create_job(self, plugin_id: str, **kwargs) -> MyJob:
        return MyJob(id=str(uuid.uuid4()), plugin_id=plugin_id, input_text=kwargs.get('input_text', ''),
                     stream=kwargs.get('stream', False), options=kwargs.get('options', {}))

    def get_worker_entry_point(self) -> Callable: return compat_worker_process

    def prepare_execute_request(self, job: MyJob) -> Dict[str, Any]:
        request = {'text': job.input_text, **job.options}
        if job.stream: request['stream'] = True
        return request

    def extract_job_result(self, job: MyJob, result_data: Dict[str, Any]) -> Dict[str, Any]:
        return {'output': result_data}

    async def _validate_resources(self, plugin_id, plugin_config):
        self.validation_calls.append((plugin_id, plugin_config))
        return self.validation_error

    def _extract_plugin_resource_identifier(self, config):
        self.resource_id_configs.append(config)
        return super()._extract_plugin_resource_identifier(config)

    def _on_job_completed(self, job_id):
        # like the spec's example override: it reads the job's result from inside the hook
        self.completed_hook_calls.append((job_id, self.get_job_result(job_id)))

class NonStreamingWorkerJobManager(MyJobManager):
    def get_worker_entry_point(self) -> Callable: return compat_worker_process_no_streaming

class DocumentedWorkerJobManager(MyJobManager):
    def get_worker_entry_point(self) -> Callable: return documented_system_worker

class ResultHooksManager(MyJobManager):
    "Overrides the documented result hooks with their documented signatures, recording and calling super()."
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_results, self.seen_chunks = [], []
    def _handle_job_result(self, result: dict):
        self.seen_results.append(dict(result))
        return super()._handle_job_result(result)
    def _handle_stream_chunk(self, chunk_data: dict):
        self.seen_chunks.append(dict(chunk_data))
        return super()._handle_stream_chunk(chunk_data)

class RaisingResultHookManager(MyJobManager):
    def _handle_job_result(self, result: dict): raise RuntimeError("result hook exploded")

class LifecycleHooksManager(MyJobManager):
    "Overrides the documented lifecycle hooks as `def hook(self)`, recording each call and calling super()."
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lifecycle_calls = []
    def _start_worker(self):
        self.lifecycle_calls.append('start')
        return super()._start_worker()
    def _init_worker(self):
        self.lifecycle_calls.append('init')
        return super()._init_worker()
    def _restart_worker(self):
        self.lifecycle_calls.append('restart')
        return super()._restart_worker()
    def _handle_worker_error(self):
        self.lifecycle_calls.append('worker_error')
        return super()._handle_worker_error()

class KeywordCreateJobManager(MyJobManager):
    "create_job written as `def create_job(self, **kwargs)`: it needs plugin_id passed by keyword."
    def create_job(self, **kwargs) -> MyJob:
        return MyJob(id=str(uuid.uuid4()), plugin_id=kwargs['plugin_id'],
                     input_text=kwargs.get('input_text', ''))

# ----- resource manager and broadcaster -----------------------------------------------------------
class RecordingResourceManager:
    "A resource manager like the spec's example, with its documented signatures; it records every call."
    def __init__(self): self.registered, self.unregistered, self.updates = [], [], []
    def register_worker(self, pid, worker_type): self.registered.append((pid, worker_type))
    def unregister_worker(self, pid): self.unregistered.append(pid)
    def update_worker_state(self, pid, status=None, job_id=None, plugin_name=None, plugin_id=None,
                            loaded_plugin_resource=None, config=None):
        self.updates.append(dict(pid=pid, status=status, job_id=job_id, plugin_name=plugin_name,
                                 plugin_id=plugin_id, loaded_plugin_resource=loaded_plugin_resource,
                                 config=config))

class SimpleEventBroadcaster:
    "The spec's SimpleEventBroadcaster, doing what an app does with a job id: show its first 8 characters."
    def __init__(self): self.events, self.errors = [], []
    async def broadcast(self, event_type, data):
        self.events.append({'type': event_type, 'data': data})
        if 'job_id' in data:
            try: data['job_id'][:8]
            except Exception as e:
                self.errors.append((event_type, repr(e)))
                raise
    def of(self, job_id) -> List[str]:
        "The kinds (`started`, ...) of the events about `job_id`, in order."
        return [e['type'].split(':', 1)[1] for e in self.events if e['data'].get('job_id') == job_id]
    def named(self, kind) -> List[dict]:
        "The data of every `compat:{kind}` event."
        return [e['data'] for e in self.events if e['type'] == f'compat:{kind}']

# ----- helpers ------------------------------------------------------------------------------------
class Rig(NamedTuple):
    manager: MyJobManager
    registry: CompatRegistry
    resources: RecordingResourceManager
    events: SimpleEventBroadcaster

def rig(cls=MyJobManager, supports_streaming=True, **config) -> Rig:
    "A manager of `cls` with every integration of this module, short reload/unload timeouts."
    registry, resources, events = CompatRegistry(), RecordingResourceManager(), SimpleEventBroadcaster()
    config = {'reload_timeout_seconds': 5, 'unload_timeout_seconds': 5, **config}
    manager = cls(worker_type='compat', category=CATEGORY, supports_streaming=supports_streaming,
                  worker_config=WorkerConfig(**config), plugin_registry=registry, resource_manager=resources,
                  event_broadcaster=events)
    return Rig(manager, registry, resources, events)

# lets events scheduled from the monitor thread reach the broadcaster
async def settle(): await asyncio.sleep(0.2)

def assert_job_ids_are_str(events: SimpleEventBroadcaster):
    for e in events.events:
        kind, data = e['type'].split(':', 1)[1], e['data']
        if kind in JOB_EVENTS or 'job_id' in data: assert isinstance(data.get('job_id'), str), e
    assert events.errors == []

# ----- 1. registry configurations arrive ----------------------------------------------------------
def test_registry_configuration_arrives(no_leftover_processes):
    async def main():
        m, registry, resources, _ = rig()
        cfg = CONFIGS[ID['echo']]
        try:
            job = await finish(m, await m.start_job(ID['echo'], input_text='hi'))
            assert job.status == 'completed', job.error
            # asked by get_unique_id()
            assert ID['echo'] in registry.config_requests, registry.config_requests
            assert job.result['output']['config'] == cfg  # the plugin was loaded with the registry's config
            assert (ID['echo'], cfg) in m.validation_calls, m.validation_calls
            await until("_extract_plugin_resource_identifier(config)",
                        lambda: cfg in m.resource_id_configs, 5)
            await until("update_worker_state(config=...)",
                        lambda: any(u['config'] == cfg and u['loaded_plugin_resource'] == 'echo-model-v1'
                                    for u in resources.updates), 5)
        finally: m.shutdown()
    run(main())

# ----- 2. get_job_result and manager.results ------------------------------------------------------
def test_job_results_by_status(no_leftover_processes):
    async def main():
        m, *_ = rig()
        try:
            ok = await finish(m, await m.start_job(ID['echo'], input_text='fine'))
            bad = await finish(m, await m.start_job(ID['fail'], options={'message': 'boom'}))
            slow = await m.start_job(ID['sleep'], options={'seconds': 1.0})
            cancelled = await m.start_job(ID['echo'], input_text='never')
            assert await m.cancel_job(cancelled.id)
            await finish(m, slow)
            assert set(ok.result) == {'output'} and ok.result['output']['kwargs']['text'] == 'fine'
            assert m.get_job_result(ok.id) == {'status': 'success', 'data': ok.result}
            assert m.get_job_result(bad.id) == {'status': 'error', 'error': 'boom'}
            assert m.get_job_result(cancelled.id) == {'status': 'cancelled'}
            ids = [ok.id, bad.id, cancelled.id, slow.id]
            assert isinstance(m.results, dict)
            assert {i: m.results.get(i) for i in ids} == {i: m.get_job_result(i) for i in ids}
            assert m.clear_completed_jobs() == 4
            assert not any(i in m.results for i in ids) and m.get_job_result(ok.id) is None
            # the job object keeps the extracted result
            assert ok.result['output']['kwargs']['text'] == 'fine'
        finally: m.shutdown()
    run(main())

# ----- 3. EXECUTE is flat on the wire -------------------------------------------------------------
def test_execute_request_is_flat(no_leftover_processes):
    async def main():
        m, *_ = rig(DocumentedWorkerJobManager, supports_streaming=False)
        try:
            job = await m.start_job(ID['echo'], input_text='hi',
                                    options={'temperature': 0.5, 'max_tokens': 7})
            job = await finish(m, job)
            assert job.status == 'completed', job.error
            kwargs = job.result['output']['kwargs']
            expected = m.prepare_execute_request(job)
            assert 'params' not in kwargs, kwargs
            assert {k: kwargs.get(k) for k in expected} == expected, kwargs
        finally: m.shutdown()
    run(main())

def test_reserved_request_keys_fail_clearly(no_leftover_processes):
    "A flat EXECUTE cannot carry a parameter named `type`: it must fail clearly, never leave the job waiting."
    async def main():
        m, *_ = rig()
        try:
            try: job = await m.start_job(ID['echo'], input_text='x', options={'type': 'summary'})
            except (TypeError, ValueError): job = None  # refused at submission: fine
            if job is not None:
                job = await finish(m, job)
                assert job.status == 'failed' and job.error, (job.status, job.error)
            after = await finish(m, await m.start_job(ID['echo'], input_text='after'))
            assert after.status == 'completed', after.error
        finally: m.shutdown()
    run(main())

# ----- 4. streaming is chosen per job -------------------------------------------------------------
def test_streamed_job_chunks_and_result(no_leftover_processes):
    async def main():
        m, _, _, events = rig()
        try:
            job = await m.start_job(ID['stream'], input_text='a b c', stream=True)
            streamed = await asyncio.wait_for(_collect(m.stream_job(job.id)), JOB_TIMEOUT)
            job = await finish(m, job)
            assert job.status == 'completed', job.error
            assert job.result == m.extract_job_result(job, {'streamed': True})
            assert m.get_job_chunks(job.id) == ['a ', 'b ', 'c']
            assert ''.join(streamed) == 'a b c'
            await settle()
            assert ''.join(d['chunk'] for d in events.named('chunk') if d['job_id'] == job.id) == 'a b c'
        finally: m.shutdown()
    run(main())

async def _collect(aiter): return [x async for x in aiter]

@pytest.mark.parametrize('missing', ['job', 'manager', 'worker', 'plugin'])
def test_streaming_needs_every_condition(no_leftover_processes, missing):
    ("Without stream=True on the job, a streaming manager, a streaming worker or a streaming plugin: "
     "no streaming.")
    async def main():
        cls = NonStreamingWorkerJobManager if missing == 'worker' else MyJobManager
        m, _, _, events = rig(cls, supports_streaming=(missing != 'manager'))
        plugin = 'echo' if missing == 'plugin' else 'stream'
        try:
            job = await m.start_job(ID[plugin], input_text='a b c', stream=(missing != 'job'))
            job = await finish(m, job)
            assert job.status == 'completed', job.error
            if plugin == 'stream': assert job.result == {'output': {'text': 'a b c', 'via': 'execute_plugin'}}
            else: assert job.result['output']['kwargs']['text'] == 'a b c'
            await settle()
            assert [d for d in events.named('chunk') if d['job_id'] == job.id] == []
            assert m.get_job_chunks(job.id) == []
        finally: m.shutdown()
    run(main())

# ----- 5. reload and unload -----------------------------------------------------------------------
def test_documented_worker_reload_unload_and_jobs(no_leftover_processes):
    async def main():
        m, *_ = rig(DocumentedWorkerJobManager, supports_streaming=False)
        new = {'model_id': 'echo-model-v2', 'prefix': '## '}
        try:
            first = await finish(m, await m.start_job(ID['echo'], input_text='one'))
            assert (first.status == 'completed' and first.started_at), (first.status, first.started_at,
                                                                        first.error)
            assert await m.reload_plugin('echo', new) is True
            second = await finish(m, await m.start_job(ID['echo'], input_text='two'))
            assert second.status == 'completed' and second.started_at
            assert second.result['output']['config'] == new
            # answered with status 'error'
            assert await m.reload_plugin('echo', {'fail_reload': True}) is False
            assert await m.unload_plugin('echo') is True
        finally: m.shutdown()
    run(main())

def test_documented_worker_cancel_and_restart(no_leftover_processes):
    "A job of a worker that never says it started runs from its handover; cancelling it restarts that worker."
    async def main():
        m, _, _, events = rig(DocumentedWorkerJobManager, supports_streaming=False)
        try:
            hang = await m.start_job(ID['sleep'], options={'seconds': 60})
            await until("job running", lambda: hang.status == 'running')
            old_pid = m.worker_process.pid
            assert await m.cancel_job(hang.id)
            after = await finish(m, await m.start_job(ID['echo'], input_text='after'))
            assert after.status == 'completed' and after.started_at, (after.status, after.error)
            assert hang.status == 'cancelled' and m.restart_count == 1 and m.worker_process.pid != old_pid
            await settle()
            assert_job_ids_are_str(events)
        finally: m.shutdown()
    run(main())

def test_failed_reload_returns_false(no_leftover_processes):
    async def main():
        m, *_ = rig()
        refused = {'model_id': 'echo-model-v2', 'fail_reload': True}
        try:
            # a first job starts the worker; echo is not used, so a reload that loads instead of reloading
            # shows
            assert (await finish(m, await m.start_job(ID['history']))).status == 'completed'
            assert await m.reload_plugin('echo', refused) is False
            calls = (await finish(m, await m.start_job(ID['history']))).result['output']['calls']
            assert ('reload', 'echo', refused) in calls, calls
            assert ('load', 'echo', refused) not in calls, calls
        finally: m.shutdown()
    run(main())

# ----- 6. documented hooks are override points ----------------------------------------------------
def test_result_and_chunk_hooks_can_be_overridden(no_leftover_processes):
    async def main():
        m, *_ = rig(ResultHooksManager)
        try:
            plain = await finish(m, await m.start_job(ID['echo'], input_text='hooked'))
            streamed = await finish(m, await m.start_job(ID['stream'], input_text='x y', stream=True))
            assert plain.status == streamed.status == 'completed', (plain.error, streamed.error)
            raw = next(r for r in m.seen_results if r.get('job_id') == plain.id)
            assert raw['status'] == 'success' and plain.result == {'output': raw['data']}
            assert raw['data']['kwargs']['text'] == 'hooked'
            assert ''.join(c.get('chunk', '') for c in m.seen_chunks
                           if c.get('job_id') == streamed.id) == 'x y'
        finally: m.shutdown()
    run(main())

def test_raising_result_hook_fails_the_job(no_leftover_processes):
    async def main():
        m, *_ = rig(RaisingResultHookManager)
        try:
            job = await finish(m, await m.start_job(ID['echo'], input_text='x'))
            assert (job.status == 'failed' and 'result hook exploded' in (job.error or '')), (job.status,
                                                                                              job.error)
        finally: m.shutdown()
    run(main())

def test_on_job_completed_called_once_per_job(no_leftover_processes):
    async def main():
        m, *_ = rig()
        try:
            jobs = [await m.start_job(ID['echo'], input_text=str(i)) for i in range(2)]
            bad = await m.start_job(ID['fail'])
            for j in jobs + [bad]: await finish(m, j)
            await until("_on_job_completed calls", lambda: len(m.completed_hook_calls) >= 2, 5)
            await settle()
            # once each, not the failed one
            assert [i for i, _ in m.completed_hook_calls] == [j.id for j in jobs]
            assert [r for _, r in m.completed_hook_calls] == [{'status': 'success', 'data': j.result}
                                                              for j in jobs]
        finally: m.shutdown()
    run(main())

@pytest.mark.parametrize('hook', ['_start_worker', '_init_worker', '_restart_worker', '_handle_worker_error',
                                  '_monitor_results'])
def test_lifecycle_hooks_need_only_self(hook):
    m = MyJobManager(worker_type='compat', category=CATEGORY)
    try:
        params = inspect.signature(getattr(m, hook)).parameters.values()
        optional = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        required = [p.name for p in params if p.default is p.empty and p.kind not in optional]
        assert required == [], f"{hook} requires {required}"
    finally: m.shutdown()

def test_lifecycle_overrides_see_a_restart(no_leftover_processes):
    async def main():
        m, *_ = rig(LifecycleHooksManager)
        try:
            hang = await m.start_job(ID['sleep'], options={'seconds': 60})
            await until("job running", lambda: hang.status == 'running')
            assert m.lifecycle_calls == ['start', 'init']
            assert await m.cancel_job(hang.id)
            await until("a call of the _restart_worker override", lambda: 'restart' in m.lifecycle_calls)
            after = await finish(m, await m.start_job(ID['echo'], input_text='after'))
            assert after.status == 'completed', after.error
            assert m.lifecycle_calls == ['start', 'init', 'worker_error', 'restart', 'start', 'init']
        finally: m.shutdown()
    run(main())

# ----- 7. manager attributes ----------------------------------------------------------------------
def test_manager_attributes(no_leftover_processes):
    async def main():
        m, *_ = rig()
        new = {'model_id': 'stream-model-v2'}
        try:
            assert m.results == {}
            job = await finish(m, await m.start_job(ID['echo'], input_text='hi'))
            assert job.status == 'completed', job.error
            assert hasattr(m, 'current_plugin_id')
            assert (m.current_plugin_name, m.current_config) == ('echo', CONFIGS[ID['echo']])
            assert m.results[job.id]['status'] == 'success'
            assert m.worker_process.pid == job.worker_pid and m.worker_process.is_alive()
            assert m.monitor_running is True
            assert await m.reload_plugin('stream', new) is True
            assert (m.current_plugin_name, m.current_config) == ('stream', new)
        finally: m.shutdown()
        assert m.monitor_running is False
    run(main())

def test_restart_attributes_after_cancel(no_leftover_processes):
    async def main():
        m, *_ = rig()
        try:
            assert m.restart_count == 0 and m.last_restart_time is None
            hang = await m.start_job(ID['sleep'], options={'seconds': 60})
            await until("job running", lambda: hang.status == 'running')
            assert m.current_plugin_id == ID['sleep']
            old_pid, before = m.worker_process.pid, time.time()
            assert m.get_job_result(hang.id) is None  # no result while it runs
            assert await m.cancel_job(hang.id)
            after = await finish(m, await m.start_job(ID['echo'], input_text='after'))
            assert after.status == 'completed', after.error
            assert hang.status == 'cancelled' and m.get_job_result(hang.id) == {'status': 'cancelled'}
            assert m.restart_count == 1
            assert isinstance(m.last_restart_time, float) and before <= m.last_restart_time <= time.time()
            assert m.worker_process.pid != old_pid and m.worker_process.is_alive()
        finally: m.shutdown()
    run(main())

class StartWatchManager(MyJobManager):
    "Notes, each time `current_plugin_id` is set to a plugin, the status its jobs had then."
    @property
    def current_plugin_id(self): return self.__dict__.get('_current_plugin_id')
    @current_plugin_id.setter
    def current_plugin_id(self, value):
        if value is not None:
            self.__dict__.setdefault('seen_at_set', []).extend(
                j.status for j in list(self.jobs.values()) if j.plugin_id == value)
        self.__dict__['_current_plugin_id'] = value

def test_the_start_is_on_record_before_its_job_reads_running(no_leftover_processes):
    "Code that waits for 'running' then reads `current_plugin_id` finds it (a race CI once hit)."
    async def main():
        m, *_ = rig(StartWatchManager)
        try:
            job = await finish(m, await m.start_job(ID['echo'], input_text='hi'))
            assert job.status == 'completed', job.error
            assert m.current_plugin_id == ID['echo']
            assert m.__dict__.get('seen_at_set') == ['pending']  # set while the job still read 'pending'
        finally: m.shutdown()
    run(main())

# ----- 8. events carry a str job_id, or none ------------------------------------------------------
def test_events_carry_job_ids(no_leftover_processes):
    async def main():
        m, _, _, events = rig()
        try:
            ok = await finish(m, await m.start_job(ID['echo'], input_text='ok'))
            bad = await finish(m, await m.start_job(ID['fail']))
            streamed = await finish(m, await m.start_job(ID['stream'], input_text='p q', stream=True))
            progressed = await finish(m, await m.start_job(ID['progress']))
            hang = await m.start_job(ID['sleep'], options={'seconds': 60})
            pending = await m.start_job(ID['echo'], input_text='never')
            assert await m.cancel_job(pending.id)
            await until("job running", lambda: hang.status == 'running')
            assert await m.cancel_job(hang.id)
            await finish(m, await m.start_job(ID['echo'], input_text='after'))
            await settle()
            assert {'submitted', 'started', 'completed'} <= set(events.of(ok.id))
            assert 'failed' in events.of(bad.id)
            assert 'chunk' in events.of(streamed.id)
            assert 'progress' in events.of(progressed.id)
            assert 'cancelled' in events.of(pending.id) and 'cancelled' in events.of(hang.id)
            assert_job_ids_are_str(events)
            restarted = events.named('worker_restarted')
            assert restarted and all('job_id' not in d for d in restarted), restarted
        finally: m.shutdown()
    run(main())

# ----- 9. a failed resource validation raises -----------------------------------------------------
def test_validation_failure_raises(no_leftover_processes):
    async def main():
        m, *_ = rig()
        try:
            assert (await finish(m, await m.start_job(ID['echo'], input_text='first'))).status == 'completed'
            before = [j.id for j in m.get_all_jobs()]
            m.validation_error = "GPU is busy"
            with pytest.raises(RuntimeError) as info: await m.start_job(ID['echo'], input_text='refused')
            assert str(info.value) == "Resource validation failed: GPU is busy"
            assert [j.id for j in m.get_all_jobs()] == before
        finally: m.shutdown()
    run(main())

# ----- 10. create_job gets plugin_id by keyword ---------------------------------------------------
def test_create_job_gets_plugin_id_by_keyword(no_leftover_processes):
    async def main():
        m, *_ = rig(KeywordCreateJobManager)
        try:
            job = await finish(m, await m.start_job(ID['echo'], input_text='kw'))
            assert job.plugin_id == ID['echo'] and job.status == 'completed', job.error
            assert job.result['output']['kwargs']['text'] == 'kw'
        finally: m.shutdown()
    run(main())

# ----- 11. small documented behaviours ------------------------------------------------------------
def test_worker_config_max_workers():
    # documented as "currently only 1"; the pool (issue 10) makes any N >= 1 valid
    assert WorkerConfig(max_workers=1).max_workers == 1 and WorkerConfig(max_workers=2).max_workers == 2
    with pytest.raises(ValueError): WorkerConfig(max_workers=0)

def test_wire_dicts_have_no_none_extras():
    assert WorkerResult('j', 'success', data={'a': 1}).to_dict() == {'type': 'result', 'job_id': 'j',
                                                                     'status': 'success', 'data': {'a': 1}}
    chunk = WorkerStreamChunk('j', 'x').to_dict()
    assert chunk['type'] == 'stream_chunk' and chunk['chunk'] == 'x' and chunk['metadata'] == {}

def test_plugin_error_message(no_leftover_processes):
    async def main():
        m, *_ = rig()
        try:
            job = await finish(m, await m.start_job(ID['fail']))
            assert job.status == 'failed' and job.error == 'bad value', job.error
            assert getattr(job, 'error_type', None) == 'ValueError'
            assert isinstance(getattr(job, 'traceback', None), str) and 'ValueError' in job.traceback
        finally: m.shutdown()
    run(main())

def test_simple_adapter_returns_result_unchanged():
    adapter = create_simple_adapter(CompatPluginManager())
    assert adapter.execute_plugin('shout', text='hi') == 'HI'
    assert adapter.execute_plugin('echo', text='x') == {'config': None, 'kwargs': {'text': 'x'}}

# ----- pending jobs -------------------------------------------------------------------------------
def test_pending_job_can_be_cancelled(no_leftover_processes):
    async def main():
        m, _, _, events = rig()
        try:
            slow = await m.start_job(ID['sleep'], options={'seconds': 1.0})
            pending = await m.start_job(ID['echo'], input_text='never')
            assert pending.status == 'pending'
            assert await m.cancel_job(pending.id) is True
            assert pending.status == 'cancelled' and pending.started_at is None
            slow = await finish(m, slow)
            after = await finish(m, await m.start_job(ID['echo'], input_text='after'))
            assert slow.status == after.status == 'completed'
            assert after.worker_pid == slow.worker_pid and m.restart_count == 0  # the worker was left alone
            await settle()
            assert 'started' not in events.of(pending.id)
        finally: m.shutdown()
    run(main())

# ----- the other differences the README lists ------------------------------------------------------
def test_missing_abstract_method_fails_at_construction():
    class Incomplete(BaseJobManager[MyJob]):
        def create_job(self, plugin_id, **kwargs): return MyJob(id='x', plugin_id=plugin_id)
        def get_worker_entry_point(self): return compat_worker_process
        def prepare_execute_request(self, job): return {}
    with pytest.raises(TypeError, match='extract_job_result'):
        Incomplete(worker_type='compat', category=CATEGORY)

def test_import_leaves_the_start_method_alone(no_leftover_processes):
    code = ("import multiprocessing, cjm_fasthtml_workers.managers.base, cjm_fasthtml_workers.core.worker; "
            "print(multiprocessing.get_start_method(allow_none=True))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'None'
