"""leptonc's Triton Python-backend model: the in-flight batching engine behind Triton's generate endpoints.

`leptonc package BUNDLE --triton REPO` copies this file into `REPO/NAME/VERSION/model.py` beside the bundle
(`REPO/NAME/VERSION/bundle.lepton/`). Triton starts one stub process per model instance; each runs one
`BatchingEngine` on the bundle (CPU, or the instance's GPU), so a request's slot, KV cache and sampling
live in leptonc and Triton only parses, routes, streams and counts.

The model is decoupled: a request gets its responses from a sender, on a thread of its own.
- `POST /v2/models/NAME/generate` with `{"text_input": "...", "max_tokens": 16}`: one response with the
  whole completion (`stream` false, the default).
- `POST /v2/models/NAME/generate_stream` with `"stream": true`: one response per text delta, then the end.
Sampling settings (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`, `stop_at_eos`) come as
optional inputs or, failing that, as request parameters. A bad request gets an error response and the
instance keeps serving. leptonc's counters are exported on Triton's metrics endpoint (pb_utils.MetricFamily).

This file runs inside Triton's stub only (it imports `triton_python_backend_utils`); nothing in leptonc
imports it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

BUNDLE_DIR = "bundle.lepton"  # beside this file in the version folder
METRICS_INTERVAL_S = 1.0


class BadRequest(ValueError):
    """A request this model cannot serve: answered with an error response, the instance keeps going."""


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from leptonc.errors import LeptonError
        from leptonc.runtime.batching import BatchingEngine, EngineConfig

        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("leptonc's model streams tokens: set model_transaction_policy "
                                                "{ decoupled: true } in config.pbtxt")
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        bundle = version_dir / params.get("leptonc_bundle", BUNDLE_DIR)
        device = None
        if args.get("model_instance_kind") == "GPU":
            # One engine per listed GPU: this stub sees only its instance's device, as leptonc's runtime opens
            # device 0 of what it sees. This relies on the stub not having opened CUDA before initialize();
            # not yet checked on a GPU machine.
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args["model_instance_device_id"])
            device = "cuda"
        elif args.get("model_instance_kind") == "CPU":
            device = "cpu"
        # verify: the bundle's hashes and toolchain are checked again here, where it is served
        engine_config = EngineConfig(max_queue=int(params.get("leptonc_max_queue", "64")), device=device, verify=True)
        try:
            self.engine = BatchingEngine.from_bundle(bundle, engine_config)
        except LeptonError as e:
            # Triton prints this in its log and marks the model UNAVAILABLE; the message is leptonc's.
            raise pb_utils.TritonModelException(f"leptonc: {e}") from None
        self.engine.start()
        labels = {"model": args["model_name"], "version": str(args["model_version"]),
                  "instance": args["model_instance_name"]}
        self._metrics = _EngineMetrics(self.engine, labels)
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._stop = threading.Event()
        self._metrics_thread = threading.Thread(target=self._publish_metrics, name="leptonc-metrics", daemon=True)
        self._metrics_thread.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt, params, stream = _parse(request, self.engine)
                submitted = self.engine.submit(prompt, params)
            except Exception as e:  # a bad request (or a full queue): an error response, never a dead instance
                _send_error(sender, e)
                continue
            thread = threading.Thread(target=self._respond, args=(request, sender, submitted, stream),
                                      name=f"leptonc-request-{submitted.id}", daemon=True)
            with self._threads_lock:
                self._threads.add(thread)
            thread.start()
        return None

    def _respond(self, request, sender, submitted, stream: bool) -> None:
        token_ids: list[int] = []
        text: list[str] = []
        try:
            for event in submitted.events():
                if request.is_cancelled():
                    submitted.cancel()
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    return
                if event.finish_reason == "error":
                    _send_error(sender, RuntimeError(event.error or "generation failed"))
                    return
                token_ids += event.token_ids
                text.append(event.text)
                last = event.finish_reason is not None
                if stream and (event.text or event.token_ids or last):
                    response = _response(event.text, event.token_ids, event.finish_reason)
                    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0)
                elif last:
                    sender.send(_response("".join(text), token_ids, event.finish_reason),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                if last:
                    return
        except Exception as e:
            submitted.cancel()
            _send_error(sender, e)
        finally:
            self._metrics.publish()
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _publish_metrics(self) -> None:
        while not self._stop.wait(METRICS_INTERVAL_S):
            self._metrics.publish()

    def finalize(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        self._stop.set()
        engine.shutdown(grace_s=5.0)
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5.0)
        self._metrics_thread.join(timeout=5.0)
        self._metrics.close()


def _value(request, name: str):
    """An optional input's value (first element), else the request parameter of that name, else None."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is not None:
        array = tensor.as_numpy().reshape(-1)
        if name == "stop":
            return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array]
        if array.size == 0:
            return None
        value = array[0]
        return value.decode("utf-8") if isinstance(value, bytes) else value.item()
    parameters = json.loads(request.parameters() or "{}")
    return parameters.get(name)


def _typed(name: str, value, kind):
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, (bool, int)):
            return bool(value)
        raise BadRequest(f"{name} must be true or false, not {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise BadRequest(f"{name} must be a whole number, not {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a {kind.__name__}, not {value!r}") from None


def _parse(request, engine):
    from leptonc.runtime.batching import SamplingParams

    text = pb_utils.get_input_tensor_by_name(request, "text_input")
    if text is None:
        raise BadRequest("text_input is required: the prompt text")
    values = text.as_numpy().reshape(-1)
    if values.size != 1:
        raise BadRequest(f"text_input must hold one prompt, not {values.size}")
    prompt = values[0].decode("utf-8") if isinstance(values[0], bytes) else str(values[0])
    if not prompt:
        raise BadRequest("text_input is empty: give a prompt")
    settings = {}
    for name, kind in (("max_tokens", int), ("temperature", float), ("top_p", float), ("top_k", int),
                       ("seed", int), ("stop_at_eos", bool)):
        value = _typed(name, _value(request, name), kind)
        if value is not None:
            settings[name] = value
    stop = _value(request, "stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest(f"stop must be a string or a list of non-empty strings, not {stop!r}")
        settings["stop"] = tuple(stop)
    stream = _typed("stream", _value(request, "stream"), bool) or False
    return engine.encode(prompt), SamplingParams(**settings), stream


def _response(text: str, token_ids, finish_reason: str | None):
    outputs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
               pb_utils.Tensor("output_ids", np.asarray(list(token_ids), dtype=np.int64))]
    if finish_reason is not None:
        outputs.append(pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)))
    return pb_utils.InferenceResponse(output_tensors=outputs)


def _send_error(sender, error: Exception) -> None:
    message = str(error) or type(error).__name__
    sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class _EngineMetrics:
    """The engine's counters as Triton custom metrics: counters grow by what changed since last time."""

    def __init__(self, engine, labels: dict):
        self.engine = engine
        self.labels = labels
        self._lock = threading.Lock()
        self._families = []
        self._counters = {}
        from leptonc.runtime.batching import ENGINE_SERIES, FINISHED_SERIES

        self._gauges = {}
        for key, name, kind, description in ENGINE_SERIES:  # the names `leptonc serve`'s /metrics uses
            if kind == "counter":
                family = pb_utils.MetricFamily(name=name + "_total", description=description,
                                               kind=pb_utils.MetricFamily.COUNTER)
                self._counters[key] = [family.Metric(labels=labels), 0]
            else:
                family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.GAUGE)
                self._gauges[key] = family.Metric(labels=labels)
            self._families.append(family)
        self._finished_key, name, description = FINISHED_SERIES
        self._finished_family = pb_utils.MetricFamily(name=name + "_total", description=description,
                                                      kind=pb_utils.MetricFamily.COUNTER)
        self._families.append(self._finished_family)
        self._finished = {}
        self.publish()

    def publish(self) -> None:
        with self._lock:
            if self._families is None:
                return
            snapshot = self.engine.metrics()
            for key, entry in self._counters.items():
                value = float(snapshot.get(key, 0))  # seconds grow by fractions
                if value > entry[1]:
                    entry[0].increment(value - entry[1])
                    entry[1] = value
            for key, metric in self._gauges.items():
                metric.set(float(snapshot.get(key, 0)))
            for reason, count in dict(snapshot.get(self._finished_key, {})).items():
                if reason not in self._finished:
                    self._finished[reason] = [self._finished_family.Metric(labels={**self.labels, "reason": reason}), 0]
                entry = self._finished[reason]
                if count > entry[1]:
                    entry[0].increment(count - entry[1])
                    entry[1] = count

    def close(self) -> None:
        # Metrics go before their families (the backend refuses the other order).
        with self._lock:
            self._counters.clear()
            self._gauges.clear()
            self._finished.clear()
            self._families = None
