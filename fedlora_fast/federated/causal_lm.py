"""``fedlora-fast train-lm``: federated DP fine-tuning of a causal LM with FFA-LoRA, a Llama-class checkpoint on a
GPU or a tiny random one on a CPU.

FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): every client derives the same frozen A from the seed,
trains only B with DP-SGD (per-sample clipping from the fused backward, Gaussian noise, Poisson sampling,
RDP accounting), and the server averages B weighted by the clients' example counts. At the end the global
adapter is written in peft's format (``OUT/adapter``), loadable with ``PeftModel.from_pretrained``.

    # GPU, a local checkpoint directory (Llama / Mistral / Qwen...), bf16, gradient checkpointing:
    fedlora-fast train-lm --model /path/to/Llama-3.2-1B --out runs/llama --rounds 3 --epsilon 8
    # CPU, seconds: a random 2-layer LlamaConfig on synthetic sequences
    fedlora-fast train-lm --tiny --out runs/tiny
    # several GPUs per silo (data parallel, one process per GPU; gloo on CPUs): the same run, split over them
    torchrun --standalone --nproc-per-node 8 -m fedlora_fast train-lm --model /path/to/Llama-3.1-8B --out runs/llama8

Text data: ``--data FILE`` (one example per line), default the SMS messages packaged with fedlora_fast.
Under ``torchrun`` every client's steps run data parallel over the processes (``DPSGD(process_group=...)``):
each process Poisson-samples its own part of the client's data at q and clips its own samples, and one
``all_reduce`` per step sums them, rank 0 alone adding the noise: the same release and accounting as one
process. Rank 0 prints and writes the results; under ``--resume`` it reads the checkpoint and sends it to the
other processes (``--out`` need not be shared; they compare what they received). The processes must build the
same run: their flags (but ``--out`` and how each process computes its steps), token ids, model config, dtype and
files are compared before training.
Not covered by the DP guarantee: the per-round training and evaluation losses (printed, and in
``metrics.json`` and the checkpoint), computed from the data without noise, as the simulation's are; the
evaluation examples are held out of training, not protected. Share them as you would the data's statistics.
The checkpoint (``OUT/checkpoint.safetensors``) also holds a fingerprint of every example's token ids, for
``--resume`` to tell other data, keyed with ``OUT/checkpoint.key`` (``checkpoint.run_key``: an unkeyed hash
would let whoever holds the checkpoint confirm which of some candidate datasets was used). Round 0's evaluation
loss, in the checkpoint and ``metrics.json``, still can (the base model on held-out rows the seed chose). They
are the operator's files; share ``OUT/adapter``.
Per-sample state: with flat clipping each physical micro-batch of n sequences keeps n * sum(out * r) float32
per-sample gradients of B until the step (examples/README.md in the repository); ``--clipping per_layer`` keeps
none. ``causal_lm_loss`` is the per-sample loss (each sequence's mean next-token cross-entropy), for
``DPSGD`` and ``GraphedAccumulator`` in a training loop of one's own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from torch import nn

import fedlora_fast as ff
from fedlora_fast.data import collate as pad_batch
from fedlora_fast.federated.checkpoint import CHECKPOINT_NAME, keyed, load_checkpoint, run_key, save_checkpoint
from fedlora_fast.federated.simulation import _hash_model_files, held_run_outputs, remove_run_outputs, run_lock
from fedlora_fast.io import atomic_write_text, unwritable
from fedlora_fast.peft_compat import export_peft
from fedlora_fast.privacy import Accountant, PoissonSampler, calibrate_noise_multiplier, graph_micro_batch_sizes
from fedlora_fast.privacy.dpsgd import check_clip_norm, per_layer_thresholds
from fedlora_fast.privacy.sampling import seed_global_from_os
from fedlora_fast.privacy import group as dp_group

LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


# what the parser holds besides the run's own flags (the command line's subcommand, handler and --debug)
NOT_FLAGS = ("command", "func", "debug")
# how a process computes its steps but not what they compute (micro-batches, CUDA graphs and activation
# checkpointing give the same clipped sums): the processes of a data-parallel run, and a resumed run, may differ
PER_PROCESS = ("micro_batch", "cuda_graph", "no_grad_ckpt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The run's flags (``fedlora-fast train-lm``'s, and ``parse_args``')."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face causal-LM checkpoint directory")
    src.add_argument("--tiny", action="store_true", help="random 2-layer LlamaConfig, synthetic data (CPU, seconds)")
    p.add_argument("--data", help="text file, one training example per line (default: packaged SMS messages)")
    p.add_argument("--out", default="runs/causal_lm",
                   help="writes OUT/metrics.json, OUT/adapter/ and OUT/checkpoint.safetensors (after every round)")
    p.add_argument("--targets", default=LLAMA_TARGETS, help="comma-separated module names, or all-linear")
    p.add_argument("--r", type=int, default=8, help="adapter rank")
    p.add_argument("--alpha", type=float, default=16.0, help="adapter scale numerator (scale = alpha / r)")
    p.add_argument("--method", choices=["ffa", "lora"], default="ffa", help="ffa: frozen A; lora: train A too")
    p.add_argument("--clients", type=int, default=None, help="default 2 (tiny) / 4")
    p.add_argument("--rounds", type=int, default=None, help="default 2 (tiny) / 3")
    p.add_argument("--local-steps", type=int, default=None,
                   help="DP-SGD steps per client per round (default 3 tiny / 10)")
    p.add_argument("--sample-rate", type=float, default=None, help="Poisson rate q per step (default 0.25 tiny / 0.05)")
    p.add_argument("--epsilon", type=float, default=8.0, help="target epsilon per client over the whole run")
    p.add_argument("--delta", type=float, default=1e-5, help="delta of the (epsilon, delta) guarantee")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping threshold C")
    p.add_argument("--clipping", choices=["flat", "per_layer"], default="flat",
                   help="flat: one threshold over all tensors; per_layer: C/sqrt(L) each (no per-sample state)")
    p.add_argument("--secure-noise", action="store_true",
                   help="DPSGD's secure mode: each step's noise the sum of four draws from the OS's secure "
                        "generator (Holohan & Braghin 2021); the default noise comes from it too (a CPU: os.urandom; "
                        "a GPU: ChaCha20 under a fresh key from os.urandom at every draw)")
    p.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default 0.02 tiny / 0.002)")
    p.add_argument("--micro-batch", type=int, default=8, help="physical batch size (sequences per backward)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default 16 tiny / 128)")
    p.add_argument("--max-examples", type=int, default=None, help="cap on the examples read (default 128 tiny / 4000)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU")
    p.add_argument("--no-grad-ckpt", action="store_true", help="disable Hugging Face gradient checkpointing")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each fixed-shape micro-batch (sequences padded to --max-length; --micro-batch rows and "
                        "the powers of two below) from a CUDA graph "
                        "(ff.GraphedAccumulator; on a CPU the same padded computation, eager); gradient "
                        "checkpointing then keeps no RNG state (exact without dropout; not yet run on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="adapter seed (A) and data split")
    p.add_argument("--resume", action="store_true",
                   help="continue the run checkpointed in --out after its last complete round (same flags, data "
                        "and model, checked by content)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")


def finish_args(args: argparse.Namespace, error) -> argparse.Namespace:
    """The defaults that depend on ``--tiny`` filled in, and what the flags alone decide checked (before the model
    loads: minutes for a real checkpoint); ``error(message)``: the parser's (it does not return)."""
    tiny = args.tiny
    defaults = dict(clients=2 if tiny else 4, rounds=2 if tiny else 3, local_steps=3 if tiny else 10,
                    sample_rate=0.25 if tiny else 0.05, lr=0.02 if tiny else 2e-3, max_length=16 if tiny else 128,
                    max_examples=128 if tiny else 4000)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in ("clients", "rounds", "local_steps", "r", "micro_batch", "max_length", "max_examples"):
        if getattr(args, name) <= 0:
            error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    # checked before the model loads (minutes for a real checkpoint)
    if not 0 < args.sample_rate <= 1:
        error(f"--sample-rate: expected a rate in (0, 1], got {args.sample_rate}")
    for name in ("epsilon", "max_grad_norm", "lr", "alpha"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) <= 0:
            error(f"--{name.replace('_', '-')}: expected a finite number > 0, got {getattr(args, name)}")
    try:
        check_clip_norm("--max-grad-norm", args.max_grad_norm)
    except ValueError as e:
        error(str(e))
    if not 0 < args.delta < 1:
        error(f"--delta: expected a number in (0, 1), got {args.delta}")
    if tiny and args.data:
        error("--data: --tiny trains on synthetic sequences; drop one of them")
    if tiny and args.max_length < 6:
        error(f"--max-length: --tiny's synthetic sequences need at least 6 tokens, got {args.max_length}")
    if not args.out:
        error("--out: expected a directory, got ''")
    if args.model is not None:
        if not Path(args.model).is_dir():
            error(f"--model: expected a local checkpoint directory (config.json, weights, tokenizer), got "
                  f"{args.model!r}: not a directory")
        if not (Path(args.model) / "config.json").is_file():
            error(f"--model: {args.model!r} holds no config.json: not a Hugging Face checkpoint directory")
    if args.resume and args.overwrite:
        error("--resume and --overwrite: expected one of them (continue the run in --out, or replace it)")
    if args.data and not Path(args.data).is_file():
        error(f"--data: {args.data!r} is not a file")
    return args


def _parser_defaults() -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return {a.dest: a.default for a in p._actions}


def parse_args(argv=None) -> argparse.Namespace:
    """The flags of a run (as ``fedlora-fast train-lm`` parses them)."""
    p = argparse.ArgumentParser(prog="fedlora-fast train-lm", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return finish_args(p.parse_args(argv), p.error)


def flag_values(args: argparse.Namespace) -> dict:
    """The run's settings: every flag's value, without what the command line adds (``NOT_FLAGS``)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_FLAGS}


def init_group() -> tuple[int, int, object | None]:
    """(rank, world size, process group) under ``torchrun`` (``WORLD_SIZE`` > 1): NCCL with one GPU per
    process (``LOCAL_RANK``), gloo on CPUs; (0, 1, None) for a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if torch.cuda.is_available():  # (bound to its GPU: NCCL need not guess the device of its first collective)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist.group.WORLD


def all_sum(values: list[float], device, group) -> list[float]:
    """``values`` summed over the group's processes (themselves without a group)."""
    if group is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, group=group)
    return t.tolist()


def sha256(value) -> str:
    """SHA-256 of ``value``'s JSON (hex)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(value) -> list[float]:
    """SHA-256 of ``value``'s JSON, as 32 numbers for ``dp_group.agree``."""
    return [float(b) for b in bytes.fromhex(sha256(value))]


def run_fields(args, examples: list[list[int]]) -> dict[str, list[float]]:
    """What every process of a data-parallel run must share before it trains, for ``dp_group.agree``: each flag
    (named in an error) and the token ids. Paths are compared by what they hold (the token ids here, the model's
    config and files after it loads), not as names: one machine's copy may lie elsewhere than another's; ``--out``
    is rank 0's alone, and how a process computes its steps (``PER_PROCESS``) is its own."""
    flags = {f"--{k.replace('_', '-')}": fingerprint(v) for k, v in sorted(flag_values(args).items())
             if k not in ("out", "model", "data", *PER_PROCESS)}
    return {**flags, "the training data": fingerprint(examples)}


def model_fields(model: nn.Module, dtype: torch.dtype) -> dict[str, list[float]]:
    """The model's config and dtype, for ``dp_group.agree``: the config without ``_name_or_path`` (the directory it
    was loaded from, which may differ between machines holding the same checkpoint)."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    return {"the model config and dtype": fingerprint([config, dtype])}


def _is_train_lm_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint this command wrote (its metadata only is read)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("state", "{}")).get("format") == "train-lm"
    except Exception:  # (missing, another file, damaged: not one to resume)
        return False


def check_out(out: Path, resume: bool = False, overwrite: bool = False) -> list[str]:
    """Refuse an ``--out`` the run could not use, before training (it is first written after the first round;
    ``run`` has already checked it writable, ``io.unwritable``, to take its lock there): no directory where
    ``metrics.json`` goes. A fresh run refuses an ``--out`` holding a run's outputs (unless ``overwrite``: the
    run removes them once it is built); a resumed one needs its checkpoint. Returns the outputs held."""
    if (out / "metrics.json").is_dir() or (out / "adapter").is_file() or (out / CHECKPOINT_NAME).is_dir():
        raise ValueError(f"--out: {str(out)!r} holds a directory metrics.json or {CHECKPOINT_NAME}, or a file "
                         "adapter; the run writes files and a directory of those names there")
    held = held_run_outputs(out)
    if resume and CHECKPOINT_NAME not in held:
        raise ValueError(f"--resume: {str(out)!r} holds no checkpoint ({CHECKPOINT_NAME}) to continue")
    if held and not (resume or overwrite):
        how = "--resume continues it, " if _is_train_lm_checkpoint(out / CHECKPOINT_NAME) else ""
        raise ValueError(f"--out: {str(out)!r} holds a run ({', '.join(held)}): {how}--overwrite replaces it, or "
                         "choose another --out")
    return held


# flags a resumed run may change: where it writes, how it resumes, and how each step is computed but not what
# it computes (PER_PROCESS)
RESUME_FREE = ("out", "resume", "overwrite", *PER_PROCESS)


def model_fingerprint(args, model: nn.Module, dtype: torch.dtype) -> str:
    """SHA-256 of the model's config and dtype and, for ``--model``, of its files (``simulation``'s rule: every
    weight, config and tokenizer file, whole): a resumed run must train against the same base."""
    h = hashlib.sha256(sha256(model_fields(model, dtype)).encode())
    if args.model:
        _hash_model_files(h, args.model)
    return h.hexdigest()


def save_round(path: Path, global_state: dict, state: dict) -> None:
    """The run after a complete round, atomically (``federated.checkpoint``: safetensors, checksummed, no RNG
    state: the run's sampling is seeded from the operating system and its noise drawn from the OS's secure generator,
    and a resumed run draws anew)."""
    key = run_key(path.parent, create=True)  # the data's fingerprint keyed (checkpoint.run_key)
    state = {**state, "data": keyed(key, state["data"]), "data_keyed": True}
    save_checkpoint(path, {f"global/{n}": t for n, t in global_state.items()}, {"format": "train-lm", **state})


def load_round(path: Path, args, fingerprints: dict, global_state: dict) -> dict:
    """The state ``save_round`` wrote, checked against this run: the flags (but ``RESUME_FREE``), the data's and
    the model's fingerprints and the trained tensors' names, dtypes and shapes. ``global_state`` is filled in."""
    tensors, state = load_checkpoint(path)
    if state.get("format") != "train-lm":
        raise ValueError(f"--resume: {path} is not a checkpoint of fedlora-fast train-lm")
    try:
        old, new, defaults = state["flags"], flag_values(args), _parser_defaults()
        for k in sorted(new):  # (a flag newer than the checkpoint: the run had its default)
            if k not in RESUME_FREE and old.get(k, defaults.get(k)) != new[k] and k not in ("model", "data"):
                raise ValueError(f"--resume: the run in {path} has --{k.replace('_', '-')} {old.get(k)!r}, this one "
                                 f"{new[k]!r}: resume with the same flags, or start a new run with another --out")
        if state.get("data_keyed"):  # (since 2026-11-29)
            fingerprints = {**fingerprints, "data": keyed(run_key(path.parent, create=False), fingerprints["data"])}
        for what, value in fingerprints.items():
            if state[what] != value:
                raise ValueError(f"--resume: the run in {path} trained on other {what} (its fingerprint differs): "
                                 "resume with the same --model and --data, or start a new run with another --out")
        saved = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")}
        if saved.keys() != global_state.keys():
            raise ValueError(f"--resume: {path} holds the tensors {sorted(saved)}, this run trains "
                             f"{sorted(global_state)}")
        for n, g in global_state.items():
            if saved[n].dtype != g.dtype or saved[n].shape != g.shape:
                raise ValueError(f"--resume: {path}: {n}: expected {g.dtype} {tuple(g.shape)}, got "
                                 f"{saved[n].dtype} {tuple(saved[n].shape)}")
            global_state[n] = saved[n].to(g.device)
        int(state["round"]), list(state["records"]), [dict(a) for a in state["accountants"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--resume: {path} lacks part of the run state ({type(e).__name__}: {e})") from None
    return state


def shared_round(path: Path, args, fingerprints: dict, global_state: dict, rank: int, device, group) -> dict:
    """``load_round`` on rank 0 alone, its result sent to every process of the data-parallel ``group`` (a JSON
    state and the tensors' bytes: no pickle): only rank 0 writes ``--out``, so the others' need not hold the
    checkpoint, nor be on the same file system. A refusal on rank 0 is raised there and, naming it, on every other
    process (none is left waiting). ``global_state`` is filled in on every process."""
    import torch.distributed as dist

    src = dist.get_global_rank(group, 0)
    payload, error = b"", None
    if rank == 0:
        try:
            payload = json.dumps(load_round(path, args, fingerprints, global_state)).encode()
        except ValueError as e:
            error = e
    size = torch.tensor([-1 if error is not None else len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    if int(size) < 0:
        if error is not None:
            raise error
        raise RuntimeError("--resume: rank 0 refused the checkpoint (its error is in its own output); every rank "
                           "stops here rather than wait for it")
    data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if rank == 0
            else torch.empty(int(size), dtype=torch.uint8, device=device))
    dist.broadcast(data, src=src, group=group)
    for name in sorted(global_state):  # (as bytes: any dtype, whatever the backend supports)
        t = global_state[name].contiguous()
        dist.broadcast(t.reshape(-1).view(torch.uint8), src=src, group=group)
        global_state[name] = t
    return json.loads(data.cpu().numpy().tobytes().decode() if rank != 0 else payload)


def load_tokenizer(args):
    """The checkpoint's tokenizer (None for --tiny)."""
    if args.tiny:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.model)


def pad_id_of(tok) -> int:
    """The id padding is written with: the tokenizer's pad, else its eos, else 0 (padding is masked out of
    the attention and the loss, so any id gives the same gradients)."""
    if tok is None:
        return 0
    for i in (tok.pad_token_id, tok.eos_token_id):
        if isinstance(i, int):
            return i
    return 0


def build_model(args, device: torch.device, dtype: torch.dtype, tok=None):
    """The causal LM (and a tokenizer, None for --tiny; ``tok``: one already loaded)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.tiny:
        cfg = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(1234)  # the "pretrained" weights every client starts from
        return LlamaForCausalLM(cfg).to(device=device, dtype=dtype), None
    tok = tok if tok is not None else load_tokenizer(args)
    # safetensors only (a pytorch_model.bin is a pickle)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, use_safetensors=True).to(device)
    return model, tok


def text_lines(text: str) -> list[str]:
    """One example per ``\n``-ended line. ``str.splitlines`` also breaks at U+2028, U+0085, form feeds...: one
    line would become several examples, each sampled on its own, and that line's privacy would be a group's."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def load_examples(args, tok) -> list[list[int]]:
    """Token id lists, one per example (at least 2 tokens each, at most ``--max-length``).

    Raises:
        ValueError: ``--max-length`` leaves no room for a token of text beside the special tokens the tokenizer
            adds (Hugging Face does not truncate then: a reviewer's BERT tokenizer gave 8-token examples at
            ``--max-length 1``, and ``[CLS] [SEP]`` alone at 2).
    """
    if args.tiny:  # arithmetic sequences mod 101: next-token structure a tiny model can pick up
        gen = random.Random(args.seed)
        out = []
        for _ in range(args.max_examples):
            start, step, length = gen.randrange(101), gen.randrange(1, 6), gen.randrange(6, args.max_length + 1)
            out.append([(start + k * step) % 101 for k in range(length)])
        return out
    if args.data:
        lines = text_lines(Path(args.data).read_text(encoding="utf-8"))
    else:
        path = Path(ff.__file__).parent / "data" / "sms_spam_collection.tsv"
        rows = text_lines(path.read_text(encoding="utf-8"))[1:]  # (the first line is the header: Label, SMS)
        lines = [line.split("\t", 1)[-1] for line in rows]
    specials = tok.num_special_tokens_to_add()
    if args.max_length < specials + 1:
        raise ValueError(f"--max-length: expected at least {specials + 1} (the tokenizer adds {specials} special "
                         f"tokens to each example, and one token of text), got {args.max_length}")
    lines = [s.strip() for s in lines if s.strip()][: args.max_examples]
    out = [tok(s, truncation=True, max_length=args.max_length)["input_ids"][: args.max_length] for s in lines]
    return [ids for ids in out if len(ids) >= 2]


def collate(seqs: list[list[int]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence (or to ``width``); padded labels are -100 (no gradient)."""
    ids, mask = pad_batch(seqs, pad_id, length=width)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], capturable: bool = True) -> torch.Tensor:
    """(n,) next-token cross-entropy, averaged over each sample's own tokens (padding excluded).
    ``capturable``: the 4-D mask, the same model as the 2-D one with nothing read back to the host (a CUDA graph
    can hold it; models with a sliding window shorter than the batch refuse it); else the 2-D mask."""
    mask = ff.capturable_attention_mask(model, batch["attention_mask"]) if capturable else batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, -100)
    tok = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    count = (labels != -100).sum(1).clamp(min=1)
    return tok.sum(1) / count


@torch.no_grad()
def evaluate(model: nn.Module, seqs: list[list[int]], pad_id: int, device, micro: int,
             rank: int = 0, world: int = 1, group=None) -> float:
    """The mean per-sequence loss on ``seqs`` (data parallel: each process evaluates every world-th one)."""
    model.eval()
    mine = seqs[rank::world]
    losses = [causal_lm_loss(model, {k: v.to(device) for k, v in collate(mine[i : i + micro], pad_id).items()},
                              capturable=False)
              for i in range(0, len(mine), micro)]
    model.train()
    total, count = all_sum([torch.cat(losses).sum().item() if losses else 0.0, float(len(mine))], device, group)
    return total / count


def train(args: argparse.Namespace) -> dict:
    """The run of parsed flags (``parse_args``; ``fedlora-fast train-lm``): data parallel over the processes under
    ``torchrun`` (``WORLD_SIZE`` > 1), else alone. Returns the metrics (every process; rank 0 writes them)."""
    rank, world, group = init_group()
    if group is None:
        return run(args, rank, world, group)
    try:
        metrics = run(args, rank, world, group)
        torch.distributed.barrier(group=group)  # (no process tears the group down while another still uses it)
        return metrics
    finally:
        torch.distributed.destroy_process_group()


def main(argv=None) -> dict:
    """``train(parse_args(argv))``."""
    return train(parse_args(argv))


def run(args, rank: int, world: int, group) -> dict:
    """The federated run (``main``); data parallel over ``group``'s ``world`` processes, or alone. Rank 0 holds
    ``--out``'s lock (``simulation.RUN_LOCK_NAME``, as ``fedlora-fast train`` does) throughout: two runs or
    resumes into one directory would both pass its checks, and train (and spend epsilon) twice for one report."""
    if rank != 0:
        return _run(args, rank, world, group)
    out = Path(args.out)
    why = unwritable(out)
    if why is not None:
        raise ValueError(f"--out: expected a writable directory, got {str(out)!r} ({why})")
    with run_lock(out, f"--out: {str(out)!r}", "choose another --out"):
        return _run(args, rank, world, group)


def _run(args, rank: int, world: int, group) -> dict:
    """``run``, with ``--out``'s lock held on rank 0."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    say = print if rank == 0 else (lambda *a, **k: None)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # what the flags alone decide first: an (epsilon, delta) that cannot be met, or an --out that cannot be
    # written, fails before the data and the model load (minutes for a real checkpoint), not after training
    total_steps = args.rounds * args.local_steps
    sigma = calibrate_noise_multiplier(target_epsilon=args.epsilon, delta=args.delta,
                                       sample_rate=args.sample_rate, steps=total_steps)
    try:
        held = check_out(Path(args.out), args.resume, args.overwrite) if rank == 0 else []
    except ValueError:
        if group is not None:  # (the others stop at the first collective, naming rank 0, rather than wait for it)
            dp_group.agree(group, device, None, what="starting the run")
        raise
    # the data next: a file or flags that leave a client without examples fail before the model loads
    tok = load_tokenizer(args)
    examples = load_examples(args, tok)
    rng = random.Random(args.seed)
    rng.shuffle(examples)
    if group is not None:
        # every process splits the same shards into disjoint parts: with other data (another file at the same
        # path, another --max-examples or --max-length, another tokenizer) the parts would overlap, and an
        # example sampled on two processes would be included with probability ~2q, its gradient up to twice in
        # one step (sensitivity 2C): the accounting would not hold. So the flags (but --out, which rank 0 alone
        # writes) and the token ids must agree before anything trains; the model's config and dtype below
        dp_group.agree(group, device, run_fields(args, examples), what="starting the run")
    n_eval = max(2, len(examples) // 10)
    eval_set, train_set = examples[:n_eval], examples[n_eval:]
    if len(train_set) < args.clients * world:
        raise ValueError(
            f"--data / --max-examples / --max-length: {len(examples)} usable examples (at least 2 tokens each), "
            f"{n_eval} held out for evaluation: {len(train_set)} to train, fewer than one per client (--clients "
            f"{args.clients})" + (f" and process ({world})" if world > 1 else "")
        )
    pad_id = pad_id_of(tok)
    model, _ = build_model(args, device, dtype, tok)
    if args.cuda_graph:  # the fixed-shape mask a capture holds, tried now (a sliding window shorter than the
        # padded length refuses it) rather than at the first step, after the model and round 0's evaluation
        try:
            ff.capturable_attention_mask(model, torch.ones(1, args.max_length, dtype=torch.long, device=device))
        except ValueError as e:
            raise ValueError(f"--cuda-graph with --max-length {args.max_length}: {e}") from None
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    # (rank 0 writes it with every round's checkpoint, a resumed run checks it, the processes of a data-parallel
    # run compare it: the model's files are read whole, seconds for a 7B model, from the page cache its loading
    # filled)
    model_fp = model_fingerprint(args, model, dtype) if rank == 0 or args.resume or group is not None else None
    if group is not None:
        dp_group.agree(group, device, {**model_fields(model, dtype), "the model's files": fingerprint(model_fp)},
                       what="building the model")
    adapters = ff.inject_adapters(model, targets, r=args.r, alpha=args.alpha, seed=args.seed,
                                  train_A=args.method == "lora")
    if not args.no_grad_ckpt:
        # under a CUDA graph the checkpoint must not save the CUDA RNG state (a capture refuses the read); without
        # dropout in the model there is nothing for it to replay, so the gradients are the same
        kwargs = {"use_reentrant": False, "preserve_rng_state": False} if args.cuda_graph else None
        if hasattr(model, "activation_checkpointing_enable"):  # (transformers >= 5.2x; the old name warns there)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.clipping == "per_layer":  # (refused now, not at the first step after round 0's evaluation)
        try:
            per_layer_thresholds(args.max_grad_norm, len(trainable))
        except ValueError as e:
            raise ValueError(f"--max-grad-norm / --clipping per_layer: {e}") from None
    # flat clipping keeps every sample's gradient of every trained tensor until the step (examples/README.md)
    state_floats = args.micro_batch * sum(p.numel() for p in trainable) if args.clipping == "flat" else 0
    say(f"model: {type(model).__name__} {dtype} on {device}; {len(adapters)} adapters, "
        f"{sum(p.numel() for p in trainable)} trainable values; {args.clipping} clipping keeps {state_floats} "
        f"per-sample floats per micro-batch of {args.micro_batch} ({state_floats * 4 / 2**20:.2f} MiB)")

    shards = [train_set[c :: args.clients] for c in range(args.clients)]  # IID split, one shard per client
    accountants = [Accountant("rdp") for _ in shards]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    global_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    say(f"{len(train_set)} training examples over {args.clients} clients, {n_eval} held out; "
        f"noise multiplier {sigma:.3f} for epsilon {args.epsilon} at delta {args.delta} "
        f"over {total_steps} steps with q={args.sample_rate}" + (f"; {world} processes per client" * (world > 1)))
    graphed = None  # --cuda-graph: the GraphedAccumulator every client's engine feeds from
    # torch's global RNG draws dropout masks (a model with dropout): from the OS's entropy, the whole state (masks
    # computable by anyone would let one sample move the others' clipped gradients; torch's own startup seed
    # keeps 32 bits on the CPU)
    seed_global_from_os()
    ckpt_path = Path(args.out) / CHECKPOINT_NAME
    fingerprints = {"data": sha256(examples), "model": model_fp}
    if args.resume:  # (data parallel: rank 0 reads the checkpoint and sends it: --out need not be shared)
        state = (load_round(ckpt_path, args, fingerprints, global_state) if group is None
                 else shared_round(ckpt_path, args, fingerprints, global_state, rank, device, group))
        records, start = list(state["records"]), int(state["round"]) + 1
        # the accounting is the flags': every client took local_steps steps at (sigma, q) per complete round
        # (empty batches included); a saved history or noise multiplier that says otherwise is refused
        accountants = [Accountant("rdp") for _ in shards]
        for a in accountants:
            a.step(noise_multiplier=sigma, sample_rate=args.sample_rate, num_steps=args.local_steps * (start - 1))
        expected = [a.state_dict() for a in accountants]
        if state["accountants"] != expected or state["noise_multiplier"] != sigma or len(records) != start:
            raise ValueError(f"--resume: {ckpt_path} holds another accounting ({len(state['accountants'])} "
                             f"accountants, noise multiplier {state['noise_multiplier']}, {len(records)} records) "
                             f"than {start - 1} rounds of these flags ({len(shards)} clients, noise multiplier "
                             f"{sigma}): a damaged or edited checkpoint")
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n in names:
                params[n].copy_(global_state[n])
        if group is not None:
            dp_group.agree(group, device, {"the checkpoint": dp_group.digest(global_state)}, what="resuming")
        say(f"resumed after round {start - 1} of {args.rounds} from {ckpt_path}")
    else:
        if rank == 0:  # --overwrite: nothing of the previous run stays beside this one's (none held otherwise)
            remove_run_outputs(Path(args.out), held)
        records, start = [{"round": 0, "eval_loss": evaluate(model, eval_set, pad_id, device, args.micro_batch,
                                                             rank, world, group)}], 1
        say(f"round 0: eval loss {records[0]['eval_loss']:.4f}")
    for rnd in range(start, args.rounds + 1):
        t0 = time.time()
        # the round's training loss: per-sample losses summed, and counted (a mean of per-micro-batch means would
        # weigh a trailing micro-batch of one like a full one: another number for --micro-batch, --cuda-graph or
        # the processes, which must not change what is computed)
        updates, weights, train_losses, train_count = [], [], [], 0
        for c, shard in enumerate(shards):
            params = dict(model.named_parameters())
            with torch.no_grad():  # every client starts from the global adapter (A is the same everywhere)
                for n in names:
                    params[n].copy_(global_state[n])
            opt = torch.optim.Adam(trainable, lr=args.lr)
            # (data parallel: the batch size expected over the whole client, the release's)
            dp = ff.DPSGD(model, opt, max_grad_norm=args.max_grad_norm, noise_multiplier=sigma,
                          expected_batch_size=max(1, round(args.sample_rate * len(shard))), clipping=args.clipping,
                          process_group=group, secure_mode=args.secure_noise)
            # data parallel: this process samples its own part of the client's data at q (the parts' draws together
            # are a Poisson sample of the client's data at q). Sampling from the OS's entropy: the accounting's
            # amplification by subsampling assumes nobody can tell which samples a step drew (a sampler seeded
            # from the public --seed would tell, and processes sharing a seed would draw together)
            part = shard[rank::world]
            sampler = PoissonSampler(len(part), args.sample_rate, steps=args.local_steps)
            if args.cuda_graph:  # one capture for the run: every client's engine (same model, shapes, clipping)
                if graphed is None:
                    sizes = graph_micro_batch_sizes(args.micro_batch)  # and the powers of two below: little padding
                    graphed = ff.GraphedAccumulator(dp, causal_lm_loss, micro_batch_size=sizes)
                else:
                    graphed.rebind(dp)
            for idx in sampler:
                if not idx:
                    dp.step(empty_batch=True)
                elif graphed is not None:  # micro-batches of --max-length tokens (plan(n)), replayed
                    graphed.accumulate(collate([part[j] for j in idx], pad_id, width=args.max_length))
                    train_losses.append(graphed.last_loss.detach())  # (on the device: no wait)
                    train_count += len(idx)
                    dp.step()
                else:
                    for i in range(0, len(idx), args.micro_batch):
                        seqs = [part[j] for j in idx[i : i + args.micro_batch]]
                        batch = {k: v.to(device) for k, v in collate(seqs, pad_id).items()}
                        loss = causal_lm_loss(model, batch, capturable=False)
                        loss.sum().backward()  # summed over samples: each sample's gradient is its own
                        train_losses.append(loss.detach().sum())
                        train_count += len(seqs)
                        dp.accumulate()
                    dp.step()
                accountants[c].step(noise_multiplier=sigma, sample_rate=args.sample_rate)
                dp.zero_grad()
            dp.detach()
            updates.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
            weights.append(len(shard))
        total = float(sum(weights))
        global_state = {n: sum(u[n].float() * (w / total) for u, w in zip(updates, weights)).to(global_state[n].dtype)
                        for n in names}
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n in names:
                params[n].copy_(global_state[n])
        eps = max(a.epsilon(args.delta) for a in accountants)
        # one read per round (data parallel: the mean over every process's micro-batches)
        summed, count = all_sum([torch.stack(train_losses).sum().item() if train_losses else 0.0,
                                 float(train_count)], device, group)
        mean_loss = summed / count if count else None
        rec = {"round": rnd, "train_loss": mean_loss,
               "eval_loss": evaluate(model, eval_set, pad_id, device, args.micro_batch, rank, world, group),
               "epsilon": eps, "seconds": time.time() - t0}
        records.append(rec)
        shown = "n/a (no sample drawn)" if mean_loss is None else f"{mean_loss:.4f}"
        say(f"round {rnd}: train loss {shown}, eval loss {rec['eval_loss']:.4f}, "
            f"epsilon {eps:.3f} (delta {args.delta}), {rec['seconds']:.1f}s")
        if rank == 0:  # (every process holds the same state: checked before the adapter is written)
            save_round(ckpt_path, global_state, {
                "flags": flag_values(args), **fingerprints, "round": rnd, "records": records,
                "accountants": [a.state_dict() for a in accountants], "noise_multiplier": sigma})
    eps = max(a.epsilon(args.delta) for a in accountants)
    if group is not None:  # every process stepped with the same gradients: they hold the same adapter
        dp_group.agree(group, device, {"the trained adapter": dp_group.digest(global_state)},
                       what="writing the adapter")
    metrics = {"config": flag_values(args), "world_size": world, "noise_multiplier": sigma, "rounds": records,
               "final": {"eval_loss": records[-1]["eval_loss"], "epsilon": eps, "delta": args.delta}}
    if rank != 0:
        return metrics
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export_peft(model, out / "adapter", metadata={"example": "causal_lm", "rounds": args.rounds, "epsilon": eps,
                                                  "delta": args.delta, "noise_multiplier": sigma})
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(f"final: eval loss {records[-1]['eval_loss']:.4f}, epsilon {eps:.3f}; adapter in {out / 'adapter'}")
    return metrics

