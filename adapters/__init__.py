"""Adapters: bridges that tell humans about input requests and carry answers back.

Each adapter is found through the ``svantic_grpc.adapters`` entry-point group and
depends only on ``svantic_grpc.adapter`` and the core's public model; the core never
imports this package. Here: Slack (``slack``) and Standard Webhooks (``webhook``).
"""
