"""Expert-parallel mode: nearby devices run each other's experts over gRPC (protos/expert.proto)."""
