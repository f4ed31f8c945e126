"""Rank rules: the hook table (which ranks run a hook, what sync follows), the one dispatcher
that applies it, and the schedule printer. The loop itself never compares ranks."""
