"""The shared bottom layer: errors, record types and their JSONL/file IO, atomic writes, typed
configs, model files. Every package may import it; it imports no stage, no CLI, no pipeline."""
