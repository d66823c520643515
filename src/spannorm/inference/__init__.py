"""Using a trained model: one loader for every checkpoint form, generation, the
lm-evaluation-harness model, the Hugging Face export and its model wrapper."""
