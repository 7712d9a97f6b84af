"""Starting and stopping a local tritonserver (see server.py and NOTES.md)."""
from vlm_export.serve.server import (
    TritonBinary,
    TritonServer,
    execution_env_parameter,
    execution_env_path,
    find_tritonserver,
    free_port,
    serve_forever,
)

__all__ = [
    "TritonBinary",
    "TritonServer",
    "execution_env_parameter",
    "execution_env_path",
    "find_tritonserver",
    "free_port",
    "serve_forever",
]
