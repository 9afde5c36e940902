"""Fine-tune SmolLM2-135M-Instruct on chat data with TRL's SFTTrainer and a lorakit LoRA-GA init.

    pip install 'lorakit[trl,recipes]'
    python examples/trl_sft.py            # a few steps on generated "a plus b" conversations

The LoRA-GA init estimates its gradients on the SFTTrainer's own dataloader inside
``prepare`` (no pre-pass); checkpoints hold ``lorakit_adapter/``, which ``lorakit.load``
reloads onto the base model and ``lorakit.export_peft`` turns into a PEFT/vLLM adapter.
"""

import random

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import lorakit
from lorakit.integrations.trl import prepare
from lorakit.recipes.models import smollm2_path


def conversations(n: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                     "completion": [{"role": "assistant", "content": f"{a + b}"}]})
    return Dataset.from_list(rows)


def main() -> None:
    path = smollm2_path()  # the packaged GGUF, converted once into a Hugging Face folder
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = SFTConfig(output_dir="runs/trl-sft", max_steps=20, per_device_train_batch_size=8, learning_rate=2e-4,
                     logging_steps=5, save_steps=20, report_to="none", use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=conversations(256), processing_class=tokenizer)
    prepare(trainer, lorakit.AdapterConfig(method="lora-ga", rank=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                                           num_samples=32), preconditioner="riemannian")
    trainer.model.print_trainable_parameters()
    trainer.train()
    lorakit.export_peft(trainer.model, "runs/trl-sft/peft", base_model_name_or_path=path, overwrite=True)


if __name__ == "__main__":
    main()
