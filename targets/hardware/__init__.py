"""Hardware target records: what each GPU (and the CPU) can run. Data only; no backend code."""
