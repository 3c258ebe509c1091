"""task_vectors."""
