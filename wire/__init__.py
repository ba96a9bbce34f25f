"""Generated protobuf and gRPC code (from proto/wire/*.proto by `make proto`)."""
