"""Run by test_sft under torchrun: SFT on the tiny model in every process."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch.distributed as dist

from guilomo.stages.sft import SftConfig, init_distributed, run_sft
from sft_helpers import allocation, model_and_tokenizer

out = Path(sys.argv[1])
cfg = SftConfig.model_validate_json(sys.argv[2])
init_distributed()
model, tok = model_and_tokenizer()
r = run_sft(
    cfg,
    dataset=out / "data",
    allocation=allocation(model),
    out=out / "two",
    model=model,
    tokenizer=tok,
    checkpoints=out / "two.ckpt",
    progress=False,
)
if dist.get_rank() == 0:
    (out / "two.losses.json").write_text(json.dumps(r.losses))
dist.destroy_process_group()
