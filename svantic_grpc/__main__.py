"""`python -m svantic_grpc` runs the CLI."""

import sys

from svantic_grpc.cli import main

sys.exit(main())
