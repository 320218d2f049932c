"""The Flower adapters, where the package layout places them (``federated``: client, server, aggregation,
partitioning, simulation, Flower adapters).

They live in ``fedlora_fast.flower``, a subpackage of its own so that ``import fedlora_fast.federated`` never
imports ``flwr`` (the ``flower`` extra); this module, imported only by name, gives the same modules and the
strategy under ``federated``. A Flower App's components point at ``fedlora_fast.flower.client_app:app`` and
``fedlora_fast.flower.server_app:app`` (``examples/flower/``).
"""

from fedlora_fast.flower import client_app, config, node, records, server_app, strategy  # noqa: F401
from fedlora_fast.flower.strategy import FedLoRAStrategy  # noqa: F401

__all__ = ["FedLoRAStrategy", "client_app", "config", "node", "records", "server_app", "strategy"]
