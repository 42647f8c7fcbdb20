"""Small shared utilities (optional-dependency loading, seeding, timers)."""
