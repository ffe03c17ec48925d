"""Writes the torch-related environment this rank sees to DIR/env_RANK.json."""
import json, os, sys
keep = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
        "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
env = {k: v for k, v in os.environ.items() if k in keep or k.startswith(("TORCHELASTIC_", "TORCH_", "PET_", "NCCL_"))}
with open(os.path.join(sys.argv[1], f"env_{os.environ['RANK']}.json"), "w") as f:
    json.dump(env, f, sort_keys=True)
