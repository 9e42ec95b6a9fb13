"""The path users take today, timed as one process: transformers + PEFT merge_and_unload + save_pretrained.

python benchmarks/peft_merge.py BASE ADAPTER OUTPUT
"""

from __future__ import annotations

import sys

import torch
import transformers
from peft import PeftModel


def main() -> None:
    base, adapter, output = sys.argv[1:4]
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(output, max_shard_size="1GB")


if __name__ == "__main__":
    main()
