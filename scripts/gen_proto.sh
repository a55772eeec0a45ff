#!/bin/sh
# Regenerate the Python gRPC stubs from nydus_core/api/**/*.proto (run from anywhere).
set -eu
cd "$(dirname "$0")/.."
find nydus_core/api -name '*.proto' | sort | xargs python -m grpc_tools.protoc -I. \
  --python_out=. --grpc_python_out=. --pyi_out=.
find nydus_core/api -type d -exec sh -c 'test -e "$1/__init__.py" || : > "$1/__init__.py"' _ {} \;
