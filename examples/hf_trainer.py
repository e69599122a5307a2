"""SAM-ON in the HuggingFace Trainer: a tiny Llama-style model, randomly initialized, on a toy copy task.

Runs on the CPU in well under a minute: ``python examples/hf_trainer.py`` (needs ``pip install "normsam[transformers]"``).
Nothing is downloaded: the model is built from a config in code.
"""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from normsam.integrations.transformers import SAMTrainer

VOCAB, LENGTH = 32, 16


class RepeatedSequences(torch.utils.data.Dataset):
    """Sequences that repeat their first half: the second half is learnable."""

    def __init__(self, n: int = 256):
        g = torch.Generator().manual_seed(0)
        half = torch.randint(0, VOCAB, (n, LENGTH // 2), generator=g)
        self.ids = torch.cat([half, half], dim=1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=LENGTH,
    )
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=60, per_device_train_batch_size=8, gradient_accumulation_steps=2,
            learning_rate=3e-3, weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=5, logging_steps=20,
            save_steps=30, bf16=True, use_cpu=True, report_to=[], disable_tqdm=True, optim="adamw_torch", seed=0,
        )
        trainer = SAMTrainer(model=model, args=args, train_dataset=RepeatedSequences(),
                             sam=dict(scope="norm", rho=0.5, perturbation="sam"))
        trainer.train()
        print(trainer.sam)
        print(trainer.sam.describe())
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        print("logged losses:", [round(x, 3) for x in losses])


if __name__ == "__main__":
    main()
