"""Offline work: the aligned base, hardened adapters, SafetyLock vectors, evaluation. Imports `guard`, never `serve`."""
