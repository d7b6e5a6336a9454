"""TransformerFAM training (docs/methods.md section 3): LoRA fine-tuning, the tiny from-scratch experiment, the curriculum (the data is in ``endless.data.passkey``)."""
