"""The ClientApp: fedlora_fast's DP-SGD client (``fedlora_fast.flower.client_app``)."""

from fedlora_fast.flower.client_app import app

__all__ = ["app"]  # `flwr run` looks for the component by static analysis of this file
