"""Worker for the multi-process tests: ``accelerate launch --cpu --num_processes 2 train_worker.py OUT BATCH``.

With a batch size, trains a tiny Llama on random token ids with the same global batch as the single-process run in
test_train.py and writes the loss curve (JSON) and the trained parameters (safetensors) from the main process.
With ``samples`` instead, every process loads ``--text teacher`` blocks (ATTNSHARE_CACHE names an empty folder) and
writes them with the number of teacher forwards it ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import tiny_model
from safetensors.torch import save_file

from attnshare.training import TrainConfig, lm_objective, train


def main(out: Path, batch_size: int) -> None:
    torch.set_num_threads(1)
    model = tiny_model("llama", num_layers=2)
    data = torch.randint(0, 128, (64 * 32,), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(seq_len=32, batch_size=batch_size, max_steps=4, lr=1e-2, progress=False, seed=3)
    result = train(model, lm_objective(), config, trainable=lambda n, p: "self_attn" in n, data=data)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({"losses": result.losses, "world": state.num_processes}))
        params = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if "self_attn" in n}
        save_file(params, str(out / "params.safetensors"))
    state.wait_for_everyone()


class StartTokenizer:
    bos_token_id = 1


def samples(out: Path) -> None:
    from accelerate import PartialState

    from attnshare.training.loop import load_blocks

    torch.set_num_threads(1)
    rank = PartialState(cpu=True).process_index
    teacher, forwards = tiny_model("llama", num_layers=2), []
    teacher.register_forward_hook(lambda *args: forwards.append(1))
    config = TrainConfig(text="teacher", teacher_tokens=4 * 16, seq_len=16, batch_size=1, progress=False, seed=3)
    blocks = load_blocks(config, StartTokenizer(), teacher=teacher)  # (4, 16)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"forwards": len(forwards), "blocks": blocks.tolist()}))


if __name__ == "__main__":
    if sys.argv[2] == "samples":
        samples(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), int(sys.argv[2]))
