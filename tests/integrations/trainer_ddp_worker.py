"""Run by tests/integrations/test_trainer_ddp.py under torchrun: a Trainer prepared with lora-ga
on each process's shard of its dataloader; every rank saves its trainable tensors after the
init and after a few DDP steps."""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from test_trainer_integration import make_trainer  # noqa: E402

import lorakit  # noqa: E402
from lorakit.integrations.transformers import prepare  # noqa: E402


def trainables(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    trainer = make_trainer(out, examples=32, per_device_train_batch_size=4, max_steps=3)
    first = next(iter(trainer.get_train_dataloader()))["input_ids"]
    save_file({"input_ids": first.contiguous()}, str(out / f"first-batch-rank{rank}.safetensors"))
    torch.manual_seed(100 + rank)  # each process's global RNG differs: lorakit's init must not depend on it
    prepare(trainer, lorakit.AdapterConfig(method="lora-ga", rank=4, num_samples=8), preconditioner="riemannian")
    save_file(trainables(trainer.model), str(out / f"init-rank{rank}.safetensors"))
    trainer.train()
    save_file(trainables(trainer.model), str(out / f"trained-rank{rank}.safetensors"))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    (out / f"world-rank{rank}.txt").write_text(str(world))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
