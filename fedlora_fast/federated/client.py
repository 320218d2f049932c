"""A federated client: receives the global adapter state, runs local DP-SGD, returns only its trainable tensors.

FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313, Alg. 1): A is frozen and shared through the seed, B (and
a fully trained head, if any) is trained with DP-SGD (Abadi et al., CCS 2016) on Poisson-sampled batches
and sent back. Each client keeps its own accountant across rounds: its privacy loss is the composition of
every step it ever took on its own data.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Callable, Sequence

import torch
from torch import nn

from fedlora_fast.data import collate
from fedlora_fast.federated import serialization
from fedlora_fast.federated.state import load_trainable, trainable_state
from fedlora_fast.privacy.accounting import Accountant, check_sample_rate
from fedlora_fast.privacy.dpsgd import DPSGD
from fedlora_fast.privacy.graphed import GraphedAccumulator, capturable_attention_mask, graph_micro_batch_sizes
from fedlora_fast.privacy.sampling import PoissonSampler, os_seeded_generator

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")


def round_lr(lr: float, round_idx: int, rounds: int, schedule: str) -> float:
    """The local learning rate of round ``round_idx`` (0-based) of ``rounds``.

    ``cosine`` decays from ``lr`` in the first round to ``lr / 10`` in the last: late rounds then move
    the global adapter less, which damps the round-to-round swings that label-skewed clients cause.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or rounds <= 1:
        return lr
    frac = min(max(round_idx, 0), rounds - 1) / (rounds - 1)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")


@functools.lru_cache(maxsize=256)
def _epsilon(mechanism: str, history: tuple, delta: float) -> float:
    """Epsilon of an accountant history; cached: opacus's RDP bound costs ~0.1 s of Python per call, and
    clients with equal (sigma, q, steps) share it."""
    return Accountant.from_state_dict({"mechanism": mechanism, "history": [list(h) for h in history]}).epsilon(delta)


GRAPH_MICRO_BATCH = 16  # the largest default micro-batch of a CUDA-graph client


def graph_micro_batch_size(expected: int, num_examples: int) -> int:
    """The largest micro-batch b of a CUDA-graph client: m + 2 standard deviations of the Poisson batch size
    (``sqrt(m (1 - q))``), at most ``GRAPH_MICRO_BATCH``, so that ~98 % of small batches fit one replay;
    larger ones take several. Capped at the dataset size. Smaller batches run on the smaller sizes of
    ``graph_micro_batch_sizes(b)`` rather than padded to b."""
    q = expected / num_examples
    fits = math.ceil(expected + 2 * math.sqrt(expected * max(0.0, 1 - q)))
    return min(num_examples, fits, GRAPH_MICRO_BATCH)


def share_cuda_graphs(clients: list["Client"]) -> None:
    """Let CUDA-graph clients that train one model in one process (the simulation) replay the same graphs:
    every one pads to the longest sequence of any, uses the largest micro-batch size any would (and the
    powers of two below it), and they keep one ``GraphedAccumulator`` between them, rebound to each
    client's engine in its ``fit``: one capture per size and one memory pool instead of one per client.
    Clients without ``cuda_graph`` are left alone. The results are those of unshared clients (right
    padding is masked; a batch's micro-batches change only where sums are added)."""
    graphed = [c for c in clients if c.cuda_graph]
    if not graphed:
        return
    seq_len = max(c.seq_len for c in graphed)
    sizes = max((c.graph_sizes for c in graphed), key=lambda s: s[0])
    cache: dict = {}
    for c in graphed:
        c.seq_len, c.graph_sizes, c._graph_cache = seq_len, sizes, cache


def _per_sample_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-sample cross-entropies of a classification batch, with a mask a CUDA graph can hold."""
    mask = capturable_attention_mask(model, batch["attention_mask"])
    logits = _class_logits(model(input_ids=batch["input_ids"], attention_mask=mask).logits)
    return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")


def _class_logits(logits: torch.Tensor) -> torch.Tensor:
    """A sequence classifier's (batch, num_labels) logits; anything else is refused by name."""
    if logits.dim() != 2:
        raise ValueError(
            f"model: Client trains sequence classifiers, whose logits are (batch, num_labels); got logits of shape "
            f"{tuple(logits.shape)} (a language model's (batch, tokens, vocabulary)?). Train a causal language model "
            "federatedly with fedlora-fast train-lm (fedlora_fast.federated.causal_lm)"
        )
    return logits


@contextlib.contextmanager
def _silenced(logger_name: str):
    """One logger's warnings silenced (its level set back after)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quiet_seeded_clients():
    """Build clients given caller-seeded generators without their warning (the simulation warns once itself)."""
    return _silenced(__name__)


def _quiet_seeded_generator_warning():
    """DPSGD warns at every construction with a caller-seeded generator; a client given one warns once, when it
    is built (and the simulation, which builds its clients quietly, warns once itself)."""
    return _silenced("fedlora_fast.privacy.dpsgd")


class Client:
    """One data holder of the federation, training a sequence classifier (``model(input_ids=...,
    attention_mask=...).logits`` of shape (batch, num_labels), per-sample cross-entropy). A causal language
    model is trained federatedly by ``fedlora-fast train-lm`` (``federated.causal_lm``), with the DP engine
    directly.

    Args:
        client_id: its index.
        input_ids: its examples' token ids (unpadded lists).
        labels: (n,) integer class ids (a non-integer label is refused, not truncated).
        pad_id: the tokenizer's padding id.
        batch_size: expected Poisson batch size m; the sample rate is ``q = m / n`` (capped at 1).
        local_steps: DP-SGD steps per round K.
        lr, optimizer, weight_decay, momentum: the local optimizer, fresh every round.
        max_grad_norm: per-sample clipping threshold C.
        noise_multiplier: sigma (0: no noise, no privacy).
        clipping: ``"flat"`` or ``"per_layer"``.
        sample_generator, noise_generator: the client's persistent RNGs of its Poisson draws and its noise
            (checkpointed with it). None (the default): from the operating system, as private training needs: the
            sampler's generator seeded with its whole state from it, the noise drawn by DPSGD's default (from the
            OS's secure generator at every draw: os.urandom on a CPU, ChaCha20 under a fresh OS key on a GPU). A
            generator passed here is for reproducible experiments only: whoever knows its seed can predict the
            noise and the draws, and the reported epsilon then means nothing (logged as a warning, once per
            client).
        physical_batch_size: split a larger sampled batch into micro-batches of at most this size (less
            memory; the same result without dropout, other dropout masks with it); None: never split.
        accountant: its accountant (a fresh RDP one when None).
        secure_mode: DPSGD's secure noise (four draws from the OS's secure generator summed, Holohan & Braghin 2021);
            the noise is then not reproducible and ``noise_generator`` is unused.
        cuda_graph: run every micro-batch through ``GraphedAccumulator``: sequences padded to the client's
            longest, the sampled batch split into micro-batches of ``graph_micro_batch_sizes(b)`` (b =
            ``physical_batch_size``, default ``graph_micro_batch_size``: b and the powers of two below it, so
            that little is padded), forward + backward + clipping replayed from CUDA graphs captured the first
            time a size is needed and reused by later rounds' engines (on a CPU model: the same padded
            computation, eager). Each client holds its graphs' memory (one pool: the activations of b rows),
            unless clients of one model share them (``share_cuda_graphs``, as the simulation does).
    """

    def __init__(
        self,
        client_id: int,
        input_ids: Sequence[Sequence[int]],
        labels: Sequence[int],
        *,
        pad_id: int,
        batch_size: int,
        local_steps: int,
        lr: float,
        max_grad_norm: float,
        noise_multiplier: float,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        clipping: str = "flat",
        sample_generator: torch.Generator | None = None,
        noise_generator: torch.Generator | None = None,
        physical_batch_size: int | None = None,
        accountant: Accountant | None = None,
        secure_mode: bool = False,
        rounds: int = 1,
        lr_schedule: str = "constant",
        cuda_graph: bool = False,
    ):
        if len(input_ids) != len(labels) or len(labels) == 0:  # len: labels may be a tensor or an array
            raise ValueError(f"client {client_id}: expected as many labels as examples (> 0), got {len(labels)} and {len(input_ids)}")
        for name, v in (("batch_size", batch_size), ("local_steps", local_steps), ("rounds", rounds)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        p = physical_batch_size  # (0 read as "never split", -1 failed later under another argument's name)
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ValueError(f"physical_batch_size: expected an int >= 1 or None, got {p!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {lr_schedule!r}")
        self.client_id = int(client_id)
        self.last_metrics: dict = {}  # the last fit's local training metrics (never sent: see fit)
        labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)  # a tensor's or array's ints
        fractional = [v for v in labels if isinstance(v, float) and not v.is_integer()]
        if fractional:
            raise ValueError(f"labels: expected integer class ids, got {fractional[:4]} (a float label would be "
                             "truncated to a class)")
        self.input_ids, self.labels = list(input_ids), torch.as_tensor(labels, dtype=torch.long)
        self.num_examples = len(self.labels)
        self.pad_id, self.batch_size, self.local_steps = int(pad_id), int(batch_size), int(local_steps)
        self.sample_rate = check_sample_rate(min(1.0, self.batch_size / self.num_examples))
        self.expected_batch_size = max(1, int(round(self.sample_rate * self.num_examples)))
        self.lr, self.optimizer, self.weight_decay, self.momentum = float(lr), optimizer, float(weight_decay), float(momentum)
        self.max_grad_norm, self.noise_multiplier, self.clipping = float(max_grad_norm), float(noise_multiplier), clipping
        if sample_generator is not None or noise_generator is not None:  # (quiet_seeded_clients: not said)
            given = [n for n, g in (("sample_generator", sample_generator), ("noise_generator", noise_generator))
                     if g is not None]
            log.warning(
                "Client %d: caller-seeded %s: for reproducible experiments only; noise and Poisson draws that can be "
                "predicted give no privacy (pass none: sampling seeded from the OS, noise drawn from its secure "
                "generator)", int(client_id), " and ".join(given),
            )
        self.sample_generator = sample_generator if sample_generator is not None else os_seeded_generator()
        self.noise_generator = noise_generator  # (None: the engine draws from the OS's secure generator)
        self.physical_batch_size = physical_batch_size
        self.accountant = accountant or Accountant()
        self.secure_mode = bool(secure_mode)
        self.rounds, self.lr_schedule = int(rounds), lr_schedule
        self.cuda_graph = bool(cuda_graph)
        # cuda_graph: the fixed padded length of every batch, the micro-batch sizes, and where the accumulator
        # (its captures) is kept across rounds: this client's own slot, or one shared by clients of one model
        # (share_cuda_graphs)
        self.seq_len = max(1, max(len(x) for x in self.input_ids))
        largest = physical_batch_size or graph_micro_batch_size(self.expected_batch_size, self.num_examples)
        self.graph_sizes = graph_micro_batch_sizes(largest)
        self._graph_cache: dict = {}

    def epsilon(self, delta: float) -> float:
        return _epsilon(self.accountant.mechanism, tuple(map(tuple, self.accountant.history)), float(delta))

    def privacy_record(self, delta: float) -> dict:
        return {
            "client": self.client_id,
            "num_examples": self.num_examples,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.accountant.steps,
            "epsilon": self.epsilon(delta),
        }

    def fit(
        self,
        model: nn.Module,
        global_message: bytes,
        *,
        round_idx: int,
        fingerprint: str,
        on_step: Callable[[], None] | None = None,
    ) -> bytes:
        """Train locally from the broadcast state; return the update message (safetensors bytes).

        The loss of a batch is the sum of per-sample cross-entropies (DPSGD divides by the expected batch
        size). The model's own dropout stays on: each sample's dropout mask is its own, so per-sample
        gradients stay exact. The masks come from torch's global RNG: for private data seed it from the
        operating system with ``privacy.sampling.seed_global_from_os()`` (torch's own startup seed keeps 32
        bits of entropy on the CPU), since masks computable from a known seed let one sample move the others'
        clipped gradients by a known amount (``simulation.seed_dropout``); the simulation seeds it per client
        and round.
        """
        tensors, _ = serialization.decode(global_message)
        load_trainable(model, tensors)
        params = list(trainable_state(model).values())
        lr = round_lr(self.lr, round_idx, self.rounds, self.lr_schedule)
        opt = make_optimizer(self.optimizer, params, lr, self.weight_decay, self.momentum)
        # built before the engine attaches: a failure here must not leave the model with a DP engine's hooks
        sampler = PoissonSampler(self.num_examples, self.sample_rate, steps=self.local_steps, generator=self.sample_generator)
        with _quiet_seeded_generator_warning():
            # The engine steps this client's persistent accountant once per noisy step (empty batches too).
            dp = DPSGD(
                model, opt, max_grad_norm=self.max_grad_norm, noise_multiplier=self.noise_multiplier,
                expected_batch_size=self.expected_batch_size, clipping=self.clipping,
                generator=None if self.secure_mode else self.noise_generator, secure_mode=self.secure_mode,
                sample_rate=self.sample_rate, accountant=self.accountant,
            )
        device = params[0].device
        model.train()
        # the training loss is summed on the device and read once after the loop: a read per step would make
        # the host wait for every step's GPU work instead of issuing the next (what a host-bound GPU run needs)
        loss_sum, seen, sizes = torch.zeros((), dtype=torch.float32, device=device), 0, []
        graphed = None
        try:
            if self.cuda_graph:  # captured once (per client, or per model when shared), fed by every round's engine
                # (clients sharing a cache but clipping differently keep apart: a capture bakes its clipping in)
                key = (self.seq_len, self.graph_sizes, self.clipping, self.max_grad_norm)
                graphed = self._graph_cache.get(key)
                if graphed is None or graphed.dp.model is not model:
                    graphed = self._graph_cache[key] = GraphedAccumulator(dp, _per_sample_loss, micro_batch_size=self.graph_sizes)
                else:
                    graphed.rebind(dp)
            for batch in sampler:
                sizes.append(len(batch))
                if not batch:
                    dp.step(empty_batch=True)
                elif graphed is not None:
                    ids, mask = collate([self.input_ids[i] for i in batch], self.pad_id, length=self.seq_len)
                    graphed.accumulate({"input_ids": ids, "attention_mask": mask, "labels": self.labels[batch]})
                    loss_sum += graphed.last_loss
                    seen += len(batch)
                    dp.step()
                else:
                    chunk = self.physical_batch_size or len(batch)
                    for start in range(0, len(batch), chunk):
                        idx = batch[start:start + chunk]
                        ids, mask = collate([self.input_ids[i] for i in idx], self.pad_id)
                        logits = _class_logits(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits)
                        loss = nn.functional.cross_entropy(logits.float(), self.labels[idx].to(device), reduction="sum")
                        loss.backward()
                        dp.accumulate()
                        loss_sum += loss.detach().float()
                    seen += len(batch)
                    dp.step()
                dp.zero_grad()
                if on_step is not None:
                    on_step()
        finally:
            dp.detach()
        # Local only: the training loss, the Poisson batch sizes and the count of dropped non-finite samples
        # are functions of this client's data (and of which samples were drawn) released without noise, so
        # they are not covered by the DP guarantee and never go into the update message (the time a fit takes
        # tracks the batch sizes too: a server timing replies learns something of them, examples/flower/README).
        self.last_metrics = {
            "train_loss": float(loss_sum) / seen if seen else None,
            "steps": len(sizes),
            "mean_batch": sum(sizes) / len(sizes) if sizes else 0.0,
            "samples_dropped": dp.samples_dropped,
        }
        meta = {  # data-independent: ids, the round, the model fingerprint, the configured step count, and
            # the example count, which FedAvg weights by and the accountant treats as public (as opacus does)
            "client_id": self.client_id,
            "round": int(round_idx),
            "fingerprint": fingerprint,
            "num_examples": self.num_examples,
            "metrics": {"steps": len(sizes)},
        }
        return serialization.encode(trainable_state(model), meta)

    # --- checkpoint state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.accountant = Accountant.from_state_dict(state["accountant"])

    def tensor_state(self) -> dict:
        """The generators' states (the noise generator's where one was given: a default client's noise comes from
        the OS's generator, which has no state)."""
        out = {"sample_rng": self.sample_generator.get_state()}
        if self.noise_generator is not None:
            out["noise_rng"] = self.noise_generator.get_state()
        return out

    def load_tensor_state(self, tensors: dict) -> None:
        """Restore ``tensor_state``. A saved noise generator's state goes to this client's noise generator: a
        default client (none: its noise from the OS's generator) refuses one rather than continue a stream
        whose seed someone may know (pass ``noise_generator=`` to continue a reproducible experiment)."""
        if "noise_rng" in tensors and self.noise_generator is None:
            raise ValueError(
                f"client {self.client_id}: noise_rng: the saved state holds a noise generator's state, and this "
                "client has none (its noise comes from the operating system's generator): pass "
                "noise_generator=torch.Generator(device=...) to the Client to continue that stream"
            )
        self.sample_generator.set_state(tensors["sample_rng"])
        if "noise_rng" in tensors:
            self.noise_generator.set_state(tensors["noise_rng"])
