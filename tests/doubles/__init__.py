"""Test doubles of engines that cannot run here (no GPU): each follows its real library's contract."""
