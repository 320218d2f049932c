"""Federated FFA-LoRA: clients, server and aggregation, partitioning, the embedded simulation, checkpoints.

FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): clients share the frozen A through its seed and send
only B; the server averages B weighted by example counts.
"""

from fedlora_fast.federated.aggregation import AGGREGATORS, CentralDP, ClientUpdate, FedAvg, make_aggregator  # noqa: F401
from fedlora_fast.federated.client import Client  # noqa: F401
from fedlora_fast.federated.partition import PAPER_LABEL_SKEW, dirichlet, iid, label_skew, partition  # noqa: F401
from fedlora_fast.federated.server import RoundResult, Server  # noqa: F401
from fedlora_fast.federated.simulation import FederatedConfig, Federation, run_simulation  # noqa: F401
