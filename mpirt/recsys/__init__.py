"""Recommenders over embedding tables sharded across the ranks, reassigned when members change."""
