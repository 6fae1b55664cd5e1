"""The app of tests/test_workers_page.py: a manager of the package's test plugins on two workers, its workers page
behind a guard (a cookie), /metrics, and a route that submits jobs.   python tests/workers_app.py PORT"""
import os, sys

import uvicorn
from fasthtml.common import FastHTML, P
from prometheus_client import CollectorRegistry
from starlette.responses import JSONResponse

from cjm_fasthtml_workers.core.config import RestartPolicy, WorkerConfig
from cjm_fasthtml_workers.extensions.fasthtml import metrics_route, worker_lifespan, workers_page
from cjm_fasthtml_workers.extensions.metrics import ManagerCollector
from helpers import TextJobManager  # the tests' manager over the scenario plugins


manager = TextJobManager('text', 'test', worker_config=WorkerConfig(max_workers=2, restart_policy=RestartPolicy.ALWAYS))
registry = CollectorRegistry()
registry.register(ManagerCollector(manager))
app = FastHTML(default_hdrs=False, canonical=False, secret_key='x', lifespan=worker_lifespan(manager))
operator = lambda request: request.cookies.get('operator') == 'yes'
workers_page(app, manager, guard=operator, interval=0.2)
metrics_route(app, registry=registry)

@app.get('/')
def index(): return P('home')

@app.post('/submit/{plugin_id}')
async def submit(plugin_id:str, seconds:float=0.0, steps:int=0, message:str='failed'):
    job = await manager.start_job(plugin_id, seconds=seconds, steps=steps, message=message)
    return JSONResponse({'job_id': job.id})

@app.get('/job/{job_id}')
def job(job_id:str):
    j = manager.get_job(job_id)
    return JSONResponse({'status': j.status if j else None})

if __name__ == '__main__':
    uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[1]), log_level='warning')
