"""The ZenML server with its dashboard, as scripts/stack.sh and the browser tests start it.

Not `zenml login --local`: that server runs without authentication, and this one holds the
MLflow and S3 secrets. Callers copy this file next to the server's state and run it there:
the server derives its source root from the main module's path, which must not be the
project (the server would then import the project's code).

    python server_main.py HOST PORT
"""

import sys

import uvicorn

uvicorn.run(
    "zenml.zen_server.zen_server_api:app",
    host=sys.argv[1],
    port=int(sys.argv[2]),
    log_level="warning",
    server_header=False,
)
