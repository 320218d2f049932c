"""A Flower App that runs fedlora_fast's federated FFA-LoRA under DP (the logic lives in fedlora_fast.flower)."""
