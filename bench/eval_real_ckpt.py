"""A training checkpoint (phi3fast train --save-every) as a PEFT adapter folder, so `phi3fast eval` can score it.

bench/eval_real.sh picks the adapter among the checkpoints of one training run by their accuracy on questions
held back from the TRAIN half (never the held-out half). A checkpoint's lora.safetensors holds the same tensors,
under the same keys, as the adapter_model.safetensors that `phi3fast train` writes at the end; the adapter config
is rebuilt from the rank, alpha and dropout the run was given.

Usage: python bench/eval_real_ckpt.py CHECKPOINT_DIR OUT_DIR --rank R --alpha A [--dropout D] [--base MODEL]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from phi3fast.errors import Phi3FastError
from phi3fast.lora import LoraConfig
from phi3fast.lora.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_config_dict
from phi3fast.training.checkpoint import verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--alpha", type=float, required=True)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--base", default="")
    args = ap.parse_args()
    problem = verify(args.checkpoint)
    if problem is not None:
        raise Phi3FastError(f"{args.checkpoint}: {problem}")
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.checkpoint / "lora.safetensors", args.out / ADAPTER_WEIGHTS)
    cfg = LoraConfig(r=args.rank, alpha=args.alpha, dropout=args.dropout)
    text = json.dumps(peft_config_dict(cfg, args.base), indent=2) + "\n"
    (args.out / ADAPTER_CONFIG).write_text(text, encoding="utf-8")
    print(f"{args.out}: adapter from {args.checkpoint}")


if __name__ == "__main__":
    main()
