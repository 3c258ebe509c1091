"""Builders the tests share (tiny models, task vectors, tasks, recipes, launches); no test module is imported
by another."""
