"""Shared test settings: hypothesis runs derandomized without deadlines (CI machines are slow and
shared; a test that fails must fail the same way on every run)."""

import os

import torch
from hypothesis import settings

settings.register_profile("eclsnn", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("eclsnn")

# Two cores: keep torch from oversubscribing when pytest and torch both spin threads.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
