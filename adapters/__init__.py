"""Adapters: bridges that tell humans about input requests and carry answers back.

Each adapter is found through the ``svantic_grpc.adapters`` entry-point group and
depends only on the core's public interface; the core never imports this package.
The Slack and webhook adapters arrive with the input-required work.
"""
