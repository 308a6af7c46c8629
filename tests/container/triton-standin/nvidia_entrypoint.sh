#!/bin/bash
# Stand-in for NGC's entrypoint (which checks drivers and CUDA forward compatibility, then runs its arguments).
set -e
exec "$@"
