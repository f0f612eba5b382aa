"""Other tools' formats: PEFT adapters, the Hugging Face Hub, and experiment trackers."""
