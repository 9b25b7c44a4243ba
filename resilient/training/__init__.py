"""The workload: a Hugging Face causal LM with a peft adapter, trained with DDP, resumable bit
for bit."""
