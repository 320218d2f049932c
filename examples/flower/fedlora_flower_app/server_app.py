"""The ServerApp: fedlora_fast's validating, aggregating server (``fedlora_fast.flower.server_app``)."""

from fedlora_fast.flower.server_app import app

__all__ = ["app"]  # `flwr run` looks for the component by static analysis of this file
