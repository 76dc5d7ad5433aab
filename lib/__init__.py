"""QLoRA supervised fine-tuning, one module per pipeline stage.

    python -m lib pipeline --run demo --data data/examples/socratic_questions.jsonl --profile tiny

Stages: data (01), model (02), train (03), evaluate (04), plots (05), merge and chat (06).
Shared: config (RunConfig and profiles), paths (run directories), tiny (the offline tiny model).
"""

__version__ = "0.1.0"
