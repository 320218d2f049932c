"""Flower integration: fedlora_fast's federated FFA-LoRA as a Flower ``ClientApp`` and ``ServerApp``.

Installed with the ``flower`` extra (``pip install fedlora_fast[flower]``); ``import fedlora_fast`` never
imports ``flwr``. Point a Flower App's components at ``fedlora_fast.flower.client_app:app`` and
``fedlora_fast.flower.server_app:app`` (see ``examples/flower/``); every setting comes from the Flower run
config with the names and defaults of ``fedlora-fast train`` (``fedlora_fast.flower.config``). The same modules
are also importable as ``fedlora_fast.federated.flower``, where the package layout places the Flower adapters.
"""

try:  # every module here needs flwr: say which extra brings it, not just "No module named 'flwr'"
    import flwr  # noqa: F401
except ImportError as _e:
    raise ImportError(
        f"fedlora_fast.flower needs Flower ({_e}): pip install 'fedlora_fast[flower]'", name=_e.name
    ) from _e
