"""TransformerFAM training (PAPERS.md section 3): data, the tiny from-scratch experiment, LoRA fine-tuning."""
