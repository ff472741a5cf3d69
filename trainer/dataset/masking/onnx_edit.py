"""A minimal in-place editor for ONNX model files: make the height and width of a model's image input free.

The U2-Net ONNX files rembg ships fix their input at 320x320, but the network is fully convolutional and its
upsampling takes its sizes from the tensors, so the same weights run at other sizes once the declared shapes
allow it. Test-time augmentation (``network``) uses that for its 512 px member. Rewriting the few protobuf
bytes of the declared shapes needs no ``onnx`` package and leaves the weights and operators untouched.
"""

from __future__ import annotations


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _submessages(buf: bytes, start: int, end: int, field: int) -> list[tuple[int, int]]:
    """(start, end) of each length-delimited ``field`` of the protobuf message in ``buf[start:end]``."""
    out, i = [], start
    while i < end:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if num == field:
                out.append((i, i + n))
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def free_image_size(onnx_model: bytes) -> bytes:
    """The ONNX model with the height and width of its 4-D inputs and outputs made free (symbolic).

    Each fixed size is a protobuf ``Dimension {dim_value: N}`` (key 0x08 + varint); it is rewritten in place as
    ``Dimension {dim_param: "hh.."}`` of exactly the same byte length, so no enclosing length changes. Only
    the graph's declared input/output shapes change: the weights and operators are untouched."""
    buf = bytearray(onnx_model)
    changed = 0
    for gs, ge in _submessages(buf, 0, len(buf), 7):  # ModelProto.graph
        for field in (11, 12):  # GraphProto.input, GraphProto.output
            for vs, ve in _submessages(buf, gs, ge, field):
                for ts, te in _submessages(buf, vs, ve, 2):  # ValueInfoProto.type
                    for tts, tte in _submessages(buf, ts, te, 1):  # TypeProto.tensor_type
                        for ss, se in _submessages(buf, tts, tte, 2):  # TypeProto.Tensor.shape
                            dims = _submessages(buf, ss, se, 1)  # TensorShapeProto.dim
                            if len(dims) != 4:
                                continue
                            for name, (ds, de) in zip("hw", dims[2:]):
                                if buf[ds] == 0x08 and de - ds >= 3:
                                    buf[ds:de] = bytes([0x12, de - ds - 2]) + name.encode() * (de - ds - 2)
                                    changed += 1
    if not changed:
        raise ValueError("no fixed image size found in the model's inputs")
    return bytes(buf)
