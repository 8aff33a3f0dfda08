"""Messages: their model, their per-session runtime and the service that sends them."""
