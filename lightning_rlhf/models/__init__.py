"""The networks: causal LMs (loading, dtypes, sequence log-probs), reward and value models, LoRA adapters, the
shared-prompt forward, and atomic Hugging Face export. Above the data layer, whose tokenizer they are fitted to."""
