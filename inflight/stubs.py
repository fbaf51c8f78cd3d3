"""Generates the gRPC stubs from protos/ with grpcio-tools (`python -m inflight.stubs`).

The stubs land in inflight/v1/ and are never committed; `import inflight.v1` builds them
when they are missing or older than the .proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PROTO = PROTO_DIR / "inflight" / "v1" / "inflight.proto"
OUT = ROOT / "inflight" / "v1" / "inflight_pb2.py"


def needs_build() -> bool:
    """Missing stubs, or stubs older than the .proto where grpcio-tools can rebuild them
    (a machine that received prebuilt stubs without grpcio-tools keeps them)."""
    if not OUT.exists():
        return True
    if not PROTO.exists() or OUT.stat().st_mtime >= PROTO.stat().st_mtime:
        return False
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        return False
    return True


def build() -> None:
    import importlib.resources

    from grpc_tools import protoc

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", str(PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


if __name__ == "__main__":
    build()
    print(f"generated {OUT.relative_to(ROOT)} from {PROTO.relative_to(ROOT)}", file=sys.stderr)
