"""Post-training (report section 4 / reference 6): SFT, rejection sampling, reward model, DPO with the Online
Merging Optimizer, GRPO. Losses are pure functions (tested against TRL); each stage has a resumable training loop
(runner.py) and a `qwen25 sft|rm|dpo|grpo|rejection-sample CONFIG` command (cli.py)."""
