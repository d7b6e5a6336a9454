"""TransformerFAM training (docs/methods.md section 3): data, the tiny from-scratch experiment, LoRA fine-tuning."""
