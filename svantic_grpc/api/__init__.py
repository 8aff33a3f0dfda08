"""gRPC servicers and interceptors: transport only, no business logic."""
