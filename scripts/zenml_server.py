"""The ZenML server with its dashboard, as scripts/stack.sh and the browser tests start it.

ZenML 0.92's dashboard route calls Starlette's pre-1.0 `TemplateResponse(name, {"request": r})`;
the Starlette 1.x that MLflow 3 brings only takes `TemplateResponse(request, name, ...)` (HTTP
500 on every dashboard page, `zenml login --local` included), and zenml[server] pins
fastapi<=0.115.8, which would downgrade MLflow's. So this translates that one call.
Callers copy this file next to the server's state and run it there: the server derives its
source root from the main module's path.

    python server_main.py HOST PORT
"""

import sys

import uvicorn
from starlette.templating import Jinja2Templates

_template_response = Jinja2Templates.TemplateResponse


def _compat(self, *args, **kwargs):
    if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], dict):
        args = (args[1]["request"], *args)
    return _template_response(self, *args, **kwargs)


Jinja2Templates.TemplateResponse = _compat
uvicorn.run(
    "zenml.zen_server.zen_server_api:app",
    host=sys.argv[1],
    port=int(sys.argv[2]),
    log_level="warning",
    server_header=False,
)
