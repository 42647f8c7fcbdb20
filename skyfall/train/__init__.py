"""Trainers: Stage 1 (satellite fit) and Stage 2 (iterative dataset update)."""
