"""Errors a newcomer trips on say what happened and what to do (issue 13): a worker that cannot start, a
plugin manager that lacks a method, commands during a job, a command that times out."""
import asyncio, logging, os, subprocess, sys, textwrap, time, uuid
import pytest

from cjm_fasthtml_workers.core.config import WorkerConfig
from cjm_fasthtml_workers.core.worker import base_worker_process
from cjm_fasthtml_workers.testing import failing_init_worker_process, ScenarioPluginManager
from helpers import TextJobManager, finish, run

HERE = os.path.dirname(os.path.abspath(__file__))

class NoUnload:
    "A plugin manager written without unload_plugin."
    def discover_plugins(self): return [{'name': 'echo'}]
    def load_plugin(self, plugin_data, config): pass
    def execute_plugin(self, plugin_name, **params): return {'text': 'x'}
    def execute_plugin_stream(self, plugin_name, **params): yield 'x'
    def reload_plugin(self, plugin_name, config=None): pass
    def check_streaming_support(self, plugin_name): return False

def no_unload_worker(request_queue, result_queue, response_queue):
    base_worker_process(request_queue, result_queue, response_queue, NoUnload)

def manager_with(entry_point, **cfg):
    class M(TextJobManager):
        def get_worker_entry_point(self): return entry_point
    return M('text', 'test', worker_config=WorkerConfig(**cfg))

def test_a_local_entry_point_is_refused_saying_why(no_leftover_processes):
    async def main():
        m = manager_with(lambda *queues: None)
        try:
            with pytest.raises(RuntimeError, match='not a module-level function'): await m.start()
        finally: m.shutdown()
    run(main())

def test_a_failing_plugin_manager_factory_names_its_exception(no_leftover_processes):
    async def main():
        m = manager_with(failing_init_worker_process)
        try:
            with pytest.raises(RuntimeError) as e: await m.start()
            msg = str(e.value)
            assert 'BrokenPluginManagerError' in msg and 'plugin manager could not be created' in msg, msg
            assert 'File ' in msg and 'testing.py' in msg, msg  # where it was raised
        finally: m.shutdown()
    run(main())

def test_a_plugin_manager_without_a_method_fails_at_the_start(no_leftover_processes):
    async def main():
        m = manager_with(no_unload_worker)
        try:
            with pytest.raises(RuntimeError) as e: await m.start()
            assert ('lacks unload_plugin' in str(e.value)
                    and 'create_simple_adapter' in str(e.value)), str(e.value)
        finally: m.shutdown()
    run(main())

def _app(tmp_path, body:str) -> subprocess.CompletedProcess:
    "Run a small app script (as a file, or with -c when `body` says so) and return what it printed."
    script = textwrap.dedent(f"""
        import asyncio, sys, uuid
        sys.path.insert(0, {HERE!r})
        from helpers import TextJobManager
        from cjm_fasthtml_workers.testing import scenario_worker_process
    """) + textwrap.dedent(body)
    path = tmp_path / 'app.py'
    path.write_text(script)
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60)

def test_an_entry_point_in_an_interactive_session_is_refused(no_leftover_processes):
    code = textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {HERE!r})
        from helpers import TextJobManager
        def my_worker(request_queue, result_queue, response_queue): pass
        class M(TextJobManager):
            def get_worker_entry_point(self): return my_worker
        async def main():
            m = M('text', 'test')
            try: await m.start()
            except RuntimeError as e: print('ERROR:', e)
            finally: m.shutdown()
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert ('interactive session' in out.stdout and 'Move it to a module' in out.stdout), (out.stdout,
                                                                                           out.stderr)

def test_a_main_script_without_its_guard_gets_a_hint(tmp_path, no_leftover_processes):
    out = _app(tmp_path, """
        # no `if __name__ == '__main__':` guard: the spawned worker runs this file again and fails there
        async def main():
            m = TextJobManager('text', 'test')
            try: await m.start()
            except RuntimeError as e: print('ERROR:', e)
            finally: m.shutdown()
        asyncio.run(main())
    """)
    assert ('ERROR:' in out.stdout and "if __name__ == '__main__':" in out.stdout), (out.stdout,
                                                                                     out.stderr[-2000:])

def test_a_worker_that_dies_before_it_can_say_why_gets_a_hint(tmp_path, no_leftover_processes):
    (tmp_path / 'app_only.py').write_text(textwrap.dedent("""
        import os
        # as a module that imports only where the app runs would (a path, a file, a variable of its own)
        if 'CJM_WORKER_TOKEN' in os.environ: raise ImportError('this module imports only in the app')
        from cjm_fasthtml_workers.testing import scenario_worker_process
        def entry_point(*queues): scenario_worker_process(*queues)
    """))
    out = _app(tmp_path, """
        sys.path.insert(0, {str(tmp_path)!r})
        import app_only
        class M(TextJobManager):
            def get_worker_entry_point(self): return app_only.entry_point
        async def main():
            m = M('text', 'test')
            try: await m.start()
            except RuntimeError as e: print('ERROR:', e)
            finally: m.shutdown()
        if __name__ == '__main__': asyncio.run(main())
    """.replace('{str(tmp_path)!r}', repr(str(tmp_path))))
    assert 'exited with code 1 before it was ready' in out.stdout, (out.stdout, out.stderr[-2000:])
    assert 'cannot import its entry point' in out.stdout and "stderr" in out.stdout, out.stdout

def test_a_command_that_times_out_never_takes_effect_later(no_leftover_processes):
    async def main():
        m = TextJobManager('text', 'test', worker_config=WorkerConfig(reload_timeout_seconds=0.3))
        try:
            await m.start()
            pid = m.worker_process.pid
            assert not await m.reload_plugin('echo', {'prefix': 'late:', 'load_seconds': 1.5})
            job = await finish(m, await m.start_job('echo', text='x'))
            # a new worker, without the late config
            assert job.result['text'] == 'x' and job.worker_pid != pid
            await asyncio.sleep(1.5)
            assert (await finish(m, await m.start_job('echo', text='y'))).result['text'] == 'y'
            assert m.get_workers_info()[0]['cancels'] == 1  # ended by the manager, not counted as a crash
        finally: m.shutdown()
    run(main())

def test_commands_during_a_job_wait_for_it(no_leftover_processes):
    async def main():
        m = TextJobManager('text', 'test')
        try:
            busy = await m.start_job('echo', text='during', seconds=0)  # loads echo
            await finish(m, busy)
            slow = await m.start_job('sleep', seconds=0.6)
            while slow.status != 'running': await asyncio.sleep(0.01)
            t0 = time.monotonic()
            assert await m.reload_plugin('echo', {'prefix': 'new:'})
            assert slow.status == 'completed' and time.monotonic() - t0 > 0.2  # it waited for the job
            assert (await finish(m, await m.start_job('echo', text='z'))).result['text'] == 'new:z'
        finally: m.shutdown()
    run(main())

def test_unloading_a_plugin_that_is_not_loaded_says_so(no_leftover_processes, caplog):
    async def main():
        m = TextJobManager('text', 'test')
        try:
            await m.start()
            with caplog.at_level(logging.INFO, logger='cjm_fasthtml_workers'):
                assert await m.unload_plugin('echo')
            assert any('no worker has it loaded' in r.getMessage() for r in caplog.records)
        finally: m.shutdown()
    run(main())
