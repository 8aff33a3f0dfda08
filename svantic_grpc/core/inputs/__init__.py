"""Input requests: what a message waits on while a human decides."""
