"""The batching engine's counters, and the series `leptonc serve`'s /metrics and the Triton model export from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from leptonc.runtime.engine_requests import FINISH_REASONS

# The engine's own series as `leptonc serve`'s /metrics and the Triton model export them, so one dashboard reads
# both: (key of BatchingEngine.metrics(), Prometheus name (a counter's gains "_total" when exposed), kind, help).
ENGINE_SERIES = (
    ("running", "leptonc_requests_running", "gauge", "Sequences holding a KV slot (prefilling or decoding)."),
    ("queued", "leptonc_requests_queued", "gauge", "Requests waiting for a KV slot."),
    ("slots_used", "leptonc_kv_slots_used", "gauge", "KV cache slots in use."),
    ("slots_total", "leptonc_kv_slots", "gauge", "KV cache slots in all (the bundle's max batch)."),
    ("prompt_tokens_total", "leptonc_prompt_tokens", "counter", "Prompt tokens prefilled."),
    ("generated_tokens_total", "leptonc_generation_tokens", "counter",
     "Tokens generated (end-of-sequence not counted)."),
    ("rejected_queue_full_total", "leptonc_rejected_queue_full", "counter",
     "Requests refused: every slot busy and the queue full."),
    ("prefill_runs_total", "leptonc_prefill_runs", "counter", "Prefill runs of the model (one may take several prompts)."),
    ("decode_steps_total", "leptonc_decode_steps", "counter", "Decode steps of the model (one advances every running "
     "sequence)."),
    # where the scheduler's time goes: these three and the rest (its own host work) add up to its running time
    ("prefill_seconds_total", "leptonc_engine_prefill_seconds", "counter",
     "Scheduler time in prefill runs: running them, or on the GPU launching them and waiting for their first "
     "tokens."),
    ("decode_wait_seconds_total", "leptonc_engine_decode_wait_seconds", "counter",
     "Scheduler time waiting for decode steps' tokens (the device busy ahead of the host)."),
    ("idle_seconds_total", "leptonc_engine_idle_seconds", "counter",
     "Scheduler time with no request to run (the device idle, waiting for clients)."),
)
FINISHED_SERIES = ("finished_total", "leptonc_sequences_finished", "Sequences ended, by reason.")  # label: reason


@dataclass
class EngineCounters:
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    prefill_runs_total: int = 0
    decode_steps_total: int = 0
    finished: dict = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    rejected_queue_full: int = 0
    prefill_seconds_total: float = 0.0
    decode_wait_seconds_total: float = 0.0
    idle_seconds_total: float = 0.0
