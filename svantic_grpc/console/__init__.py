"""The operator console: approvals, sessions and agents in a browser, at ``/console``.

Server-rendered pages (Jinja2, autoescaped) on the mesh's HTTP server; a tenant
credential signs in (the same ``client_id``/``client_secret`` as ``GetToken``);
approvals are answered as surface ``console``. See ``app.py`` for the routes.
"""

from svantic_grpc.console.app import Console, console_routes

__all__ = ["Console", "console_routes"]
