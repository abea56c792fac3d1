"""safety-guard's vLLM plug-in: SafetyLock biases, live anchor probes, metrics, admin routes, vetting gate.

Imports vLLM only inside functions, so `import serve` is cheap and works where vLLM is not installed.
"""
