"""Generated gRPC stubs for tiergate.v1 (see scripts/gen_protos.py)."""
