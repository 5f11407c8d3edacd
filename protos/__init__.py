"""gRPC definitions (expert.proto) and their generated stubs; regenerate with scripts/generate_protos.sh."""
