"""The step model's I/O contract is defined once (seqguard.step_contract); the Triton model.py keeps
its own copy (seqguard may not be installed inside Triton), so that copy is checked against it here."""
from __future__ import annotations

import ast

import numpy as np

from seqguard import step_contract as contract
from seqguard.triton_repo import COMMITTED_MODEL_PY, render_config


def _triton_model_constants() -> dict:
    """INPUT_NAMES, OUTPUT_NAMES and _INPUT_DTYPES as model.py spells them, read without importing it
    (it imports triton_python_backend_utils, which exists only inside Triton)."""
    found = {}
    for node in ast.parse(COMMITTED_MODEL_PY.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("INPUT_NAMES", "OUTPUT_NAMES"):
                found[name] = ast.literal_eval(node.value)
            elif name == "_INPUT_DTYPES":
                found[name] = {ast.literal_eval(k): np.dtype(getattr(np, v.attr))
                               for k, v in zip(node.value.keys, node.value.values)}
    return found


def test_triton_model_py_copy_equals_the_contract():
    copy = _triton_model_constants()
    assert copy["INPUT_NAMES"] == contract.INPUT_NAMES
    assert copy["OUTPUT_NAMES"] == contract.OUTPUT_NAMES
    assert copy["_INPUT_DTYPES"] == {n: contract.DTYPES[n] for n in contract.INPUT_NAMES}


def test_rendered_config_declares_every_tensor_of_the_contract():
    text = render_config(n_features=7, hidden=5)
    for name in contract.INPUT_NAMES + contract.OUTPUT_NAMES:
        dims = ", ".join(map(str, contract.trailing_dims(7, 5)[name]))
        assert f'name: "{name}"\n    data_type: TYPE_{contract.TRITON_DTYPES[name]}\n    dims: [ {dims} ]' in text
    assert f"max_batch_size: {contract.MAX_BATCH_ROWS}\n" in text


def test_input_arrays_convert_to_the_contract_dtypes_and_shapes():
    feeds = contract.input_arrays([1, 2, 3], np.zeros((3, 4), np.float64), np.zeros((3, 2)), np.zeros((3, 2)))
    assert list(feeds) == list(contract.INPUT_NAMES)
    assert {n: a.dtype for n, a in feeds.items()} == {n: contract.DTYPES[n] for n in contract.INPUT_NAMES}
    assert feeds["event_type"].shape == (3, 1)
    assert all(a.flags.c_contiguous for a in feeds.values())
