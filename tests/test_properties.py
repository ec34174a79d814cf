"""Property tests (hypothesis) of the request decoders: V2 tensors (JSON and binary), NPY and PNG
uploads, records. Any input either decodes to exactly what was sent or is refused with a
4xx :class:`~service.errors.ServiceError`; nothing else may escape (an escape would be a 500)."""

from __future__ import annotations

import io
import math

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from models.spec import DataSpec
from service.core.inference import impute
from service.errors import ServiceError
from service.frontend.api.inputs import anomaly_records, decode_upload, instances_to_array, parse_json
from service.frontend.api.schemas import parse
from service.frontend.api.v2 import DTYPES, InferRequest, decode_tensor, split_body

IMAGE = DataSpec(kind="image", shape=(1, 8, 8), levels=17)
RECORD = DataSpec(kind="record", shape=(3,), feature_names=["hr", "sbp", "gcs"], ranges=[(30, 200), (60, 230), (3, 15)],
                  discrete_features=[2])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
FAST = settings(max_examples=150, deadline=None, derandomize=True)  # the same cases in every CI run


def refused_cleanly(fn, *args) -> object | None:  # noqa: ANN001
    """``fn(*args)``, or ``None`` when it refuses with a 4xx ServiceError; anything else fails the test."""
    try:
        return fn(*args)
    except ServiceError as e:
        assert 400 <= e.status < 500 and e.message
        return None


def _decode_v2(obj: object, binary: bytes = b"") -> np.ndarray | None:
    req = parse(InferRequest, obj)
    return decode_tensor(req.inputs[0], binary, 0)[0]


@FAST
@given(st.sampled_from(sorted(DTYPES)), hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), st.data())
def test_v2_tensor_round_trips_json_and_binary(datatype: str, shape: tuple, data: st.DataObject) -> None:
    dtype = DTYPES[datatype]
    arr = data.draw(hnp.arrays(dtype, shape, elements=hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)))
    as_json = {"inputs": [{"name": "input", "datatype": datatype, "shape": list(shape), "data": arr.ravel().tolist()}]}
    np.testing.assert_array_equal(_decode_v2(orjson.loads(orjson.dumps(as_json))), arr)
    raw = arr.astype(dtype.newbyteorder("<")).tobytes()
    as_binary = {"inputs": [{"name": "input", "datatype": datatype, "shape": list(shape), "parameters": {"binary_data_size": len(raw)}}]}
    head = orjson.dumps(as_binary)
    got_head, got_binary = split_body(head + raw, str(len(head)))
    np.testing.assert_array_equal(_decode_v2(parse_json(got_head), got_binary), arr)


@FAST
@given(st.dictionaries(st.sampled_from(["id", "inputs", "outputs", "parameters", "x"]), JSON, max_size=4),
       st.lists(st.dictionaries(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]), JSON), max_size=2))
def test_v2_malformed_requests_are_refused_cleanly(obj: dict, tensors: list) -> None:
    if tensors:
        obj = {**obj, "inputs": tensors}
    refused_cleanly(_decode_v2, obj, b"\x00" * 16)


@FAST
@given(st.text(max_size=12), st.binary(max_size=64))
def test_v2_binary_header_is_a_length_within_the_body(header: str, body: bytes) -> None:
    out = refused_cleanly(split_body, body, header)
    if out is not None:
        assert int(header.strip()) <= len(body) and out[0] + out[1] == body


@FAST
@given(st.binary(max_size=256))
def test_arbitrary_bytes_as_npy_or_png_are_refused_cleanly(body: bytes) -> None:
    for ctype in ("application/x-npy", "image/png", "image/jpeg", "text/plain"):
        refused_cleanly(decode_upload, body, ctype, IMAGE)


@FAST
@given(hnp.arrays(st.sampled_from([np.uint8, np.int16, np.int64, np.float32, np.float64, np.bool_, np.complex64]),
                  hnp.array_shapes(min_dims=0, max_dims=4, max_side=9)))
def test_npy_uploads_decode_exactly_or_are_refused(arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    x = refused_cleanly(decode_upload, buf.getvalue(), "application/x-npy", IMAGE)
    if x is not None:
        assert x.shape[1:] == IMAGE.shape and x.dtype == np.float32
        np.testing.assert_array_equal(x.reshape(arr.shape if arr.shape != IMAGE.shape else (1, *IMAGE.shape)), arr.astype(np.float32))
        assert x.min() >= 0 and x.max() <= 16 and (x == np.round(x)).all()


@FAST
@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from(["L", "RGB", "RGBA", "1", "I;16"]), st.randoms())
def test_png_uploads_decode_to_the_models_levels_or_are_refused(h: int, w: int, mode: str, rnd) -> None:  # noqa: ANN001
    from PIL import Image

    pixels = np.array([rnd.randrange(256) for _ in range(h * w)], dtype=np.uint8).reshape(h, w)
    img = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    x = refused_cleanly(decode_upload, buf.getvalue(), "image/png", IMAGE)
    if x is not None:
        assert (h, w) == (8, 8) and mode in ("L", "1", "I;16") and x.shape == (1, 1, 8, 8)
        if mode == "L":
            np.testing.assert_array_equal(x[0, 0], np.round(pixels.astype(np.float64) * 16 / 255.0))


VALUE = st.none() | st.booleans() | st.integers(-10**40, 10**40) | st.floats() | st.text(max_size=3)


@FAST
@given(st.lists(st.dictionaries(st.sampled_from(["hr", "sbp", "gcs", "other"]), VALUE, max_size=4), min_size=1, max_size=4))
def test_records_decode_exactly_or_are_refused(records: list) -> None:
    x = refused_cleanly(instances_to_array, records, RECORD, "records")
    if x is not None:
        for rec, row in zip(records, x):
            assert set(rec) == {"hr", "sbp", "gcs"}
            for k, name in enumerate(["hr", "sbp", "gcs"]):
                assert math.isfinite(rec[name]) and row[k] == np.float32(rec[name])
            assert float(rec["gcs"]).is_integer()  # an integer-valued feature: a fraction is refused
    decoded = refused_cleanly(anomaly_records, records, RECORD, "records")  # absent features allowed: the core fills them
    if decoded is not None:
        x, observed = decoded
        for rec, seen in zip(records, observed):
            assert set(rec) <= {"hr", "sbp", "gcs"}  # an unknown feature is refused by name
            assert [n for n, s in zip(("hr", "sbp", "gcs"), seen) if not s] == [n for n in ("hr", "sbp", "gcs") if rec.get(n) is None]
        full = refused_cleanly(impute, RECORD, [70.0, 120.0, 14.6], x, observed, "records")
        if full is None:
            assert not observed.any(1).all()  # refused only for a record with no feature at all
        else:
            assert observed.any(1).all() and np.isfinite(full).all()
            np.testing.assert_array_equal(full[observed], x[observed])  # what was sent is kept
            assert (full[:, 2][~observed[:, 2]] == 15.0).all()  # a fill between levels is rounded to one


@FAST
@given(JSON)
def test_instances_of_any_json_decode_or_are_refused(obj: object) -> None:
    for spec in (IMAGE, RECORD):
        x = refused_cleanly(instances_to_array, obj, spec)
        if x is not None:
            assert x.shape[1:] == spec.shape and np.isfinite(x).all()
