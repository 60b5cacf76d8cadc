"""Triton Python-backend model: the seqguard LSTM step encoder, run with ONNX Runtime on CPU.

One call of ``execute`` receives every request the dynamic batcher merged. Their rows are
concatenated into ONE ONNX Runtime run (one GEMM per layer instead of one per request), and
the output rows are split back so that response ``i`` answers request ``i``.

I/O contract (only the batch dimension is dynamic)::

    inputs : event_type INT64 [B, 1]   features FP32 [B, F]   h_in FP32 [B, H]   c_in FP32 [B, H]
    outputs: h_out FP32 [B, H]  c_out FP32 [B, H]  embedding FP32 [B, H]  surprise FP32 [B, 2]

A request that cannot be served (bad shape, ONNX Runtime error such as an out-of-range event
type) gets a ``TritonError`` response; the other requests of the same batch are still answered
and the model instance keeps running.

Config parameter ``ort_intra_op_threads`` (string, default "1") sets ONNX Runtime's intra-op
thread pool size; the model loads ``model.onnx`` from its own version directory.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUT_NAMES = ("event_type", "features", "h_in", "c_in")
OUTPUT_NAMES = ("h_out", "c_out", "embedding", "surprise")
_INPUT_DTYPES = {"event_type": np.int64, "features": np.float32,
                 "h_in": np.float32, "c_in": np.float32}


def _param(model_config: dict, key: str, default: str) -> str:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value.strip() else default


class TritonPythonModel:
    """Step encoder served by ONNX Runtime inside Triton's Python backend."""

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", "seqguard_encoder")
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, "model.onnx")
        if not os.path.isfile(onnx_path):  # fall back to the directory holding this file
            onnx_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.onnx")
        try:
            threads = int(_param(self.model_config, "ort_intra_op_threads", "1"))
        except ValueError as exc:
            raise pb_utils.TritonModelException(
                f"parameter ort_intra_op_threads must be an integer: {exc}") from None

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(threads, 1)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx_path, sess_options=so,
                                            providers=["CPUExecutionProvider"])

        names_in = {i.name for i in self.session.get_inputs()}
        names_out = {o.name for o in self.session.get_outputs()}
        missing = (set(INPUT_NAMES) - names_in) | (set(OUTPUT_NAMES) - names_out)
        if missing:
            raise pb_utils.TritonModelException(
                f"{onnx_path} does not honour the step-model contract; missing {sorted(missing)}")
        # Static trailing dims of each input (None where the ONNX leaves them symbolic).
        self.trailing = {i.name: tuple(d if isinstance(d, int) else None for d in i.shape[1:])
                         for i in self.session.get_inputs()}
        self.out_dtypes = {
            name: pb_utils.triton_string_to_numpy(
                pb_utils.get_output_config_by_name(self.model_config, name)["data_type"])
            for name in OUTPUT_NAMES
        }
        self.logger = pb_utils.Logger
        self.logger.log_info(f"{self.model_name}: loaded {onnx_path} "
                             f"(ORT {ort.__version__}, intra_op_threads={so.intra_op_num_threads})")

    # -- helpers -----------------------------------------------------------------------------
    def _read_inputs(self, request) -> dict:
        """The request's inputs as contiguous numpy arrays; ValueError names a bad one."""
        arrays = {}
        rows = None
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input '{name}'")
            arr = np.ascontiguousarray(tensor.as_numpy(), dtype=_INPUT_DTYPES[name])
            want = self.trailing[name]
            if arr.ndim != 1 + len(want) or any(w is not None and w != g
                                                for w, g in zip(want, arr.shape[1:])):
                shape = ["batch"] + [w if w is not None else "?" for w in want]
                raise ValueError(f"input '{name}' has shape {list(arr.shape)}, expected {shape}")
            if rows is None:
                rows = arr.shape[0]
            elif arr.shape[0] != rows:
                raise ValueError(f"input '{name}' has {arr.shape[0]} rows, "
                                 f"'{INPUT_NAMES[0]}' has {rows}")
            arrays[name] = arr
        return arrays

    def _run(self, feeds: dict) -> list:
        return self.session.run(list(OUTPUT_NAMES), feeds)

    def _response(self, outputs, start: int, stop: int):
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:stop],
                                                              dtype=self.out_dtypes[name]))
                   for name, out in zip(OUTPUT_NAMES, outputs)]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _error(message: str):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))

    # -- Triton entry points -------------------------------------------------------------------
    def execute(self, requests):
        responses = [None] * len(requests)
        good = []  # (request index, inputs)
        for i, request in enumerate(requests):
            try:
                good.append((i, self._read_inputs(request)))
            except Exception as exc:  # noqa: BLE001 - every failure becomes a response
                responses[i] = self._error(f"{self.model_name}: bad request: {exc}")

        if good:
            try:
                if len(good) == 1:
                    feeds = good[0][1]
                else:
                    feeds = {name: np.concatenate([inp[name] for _, inp in good], axis=0)
                             for name in INPUT_NAMES}
                outputs = self._run(feeds)
                start = 0
                for i, inp in good:
                    stop = start + inp["event_type"].shape[0]
                    responses[i] = self._response(outputs, start, stop)
                    start = stop
            except Exception as batch_exc:  # noqa: BLE001
                if len(good) == 1:
                    responses[good[0][0]] = self._error(
                        f"{self.model_name}: inference failed: {batch_exc}")
                else:
                    # One bad request (e.g. an unknown event type) must not fail its batch-mates:
                    # rerun each request alone to answer the good ones.
                    self.logger.log_warn(f"{self.model_name}: merged batch of {len(good)} "
                                         f"requests failed ({batch_exc}); rerunning one by one")
                    for i, inp in good:
                        try:
                            outputs = self._run(inp)
                            responses[i] = self._response(outputs, 0, inp["event_type"].shape[0])
                        except Exception as exc:  # noqa: BLE001
                            responses[i] = self._error(
                                f"{self.model_name}: inference failed: {exc}")
        return responses

    def finalize(self):
        self.session = None
