"""Adapters: bridges that tell humans about input requests and carry their answers back.

Each adapter is found through the ``svantic_grpc.adapters`` entry-point group and
depends only on the adapter interface (``svantic_grpc.adapter``) and the core's public
model; the core never imports this package. Here: ``slack`` (Block Kit messages,
buttons and modals) and ``webhook`` (Standard Webhooks notifications out, signed or
token-carrying resolutions in).
"""
