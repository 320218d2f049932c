"""Federated DP fine-tuning of a causal LM with FFA-LoRA: ``fedlora-fast train-lm``, from a checkout.

The run lives in the package (``fedlora_fast.federated.causal_lm``; ``fedlora-fast train-lm --help``); this
script passes its arguments on, for the commands of examples/README.md:

    python examples/causal_lm.py --tiny --out runs/tiny      # = fedlora-fast train-lm --tiny --out runs/tiny
    torchrun --standalone --nproc-per-node 8 examples/causal_lm.py --model /path/to/Llama-3.1-8B --out runs/llama8
"""

import sys

from fedlora_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-lm", *sys.argv[1:]]))
