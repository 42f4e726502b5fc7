"""The teacher service's wire format: packed arrays, not JSON objects a position (the OpenAI API's top-K
is a JSON object per entry with its decoded text, ~2 KB a position).

A message is a 4-byte little-endian length, a JSON header of that length, then raw little-endian arrays:

- request (`POST /aopd/score`): header `{"k", "dtype", "sequences": [[length, start, count], ...]}`, then
  int32 token ids of every sequence, one after the other. A sequence's scored positions are
  `start .. start + count - 1` (the response: the prompt before them is context only);
- answer: header `{"k", "dtype", "counts": [...]}`, then for all scored positions in order the sampled
  token's log-prob (float32 or bfloat16), the top-K ids (int32, K a position) and the top-K log-probs.

`tokenizer_fingerprint` is how client and service agree that they tokenize alike before any work.

    python -m pytest tests/test_teacher_service.py -q -k wire
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch

MAGIC = "aopd-teacher/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _message(header: dict, *arrays: torch.Tensor) -> bytes:
    head = json.dumps({"format": MAGIC, **header}).encode()
    return struct.pack("<I", len(head)) + head + b"".join(_raw(a) for a in arrays)


def _raw(tensor: torch.Tensor) -> bytes:
    tensor = tensor.contiguous().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its 2-byte pattern as int16
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()  # little-endian on every machine aopd runs on (x86-64, arm64)


def _split(data: bytes) -> tuple[dict, memoryview]:
    if len(data) < 4:
        raise ValueError("a message shorter than its length prefix")
    (length,) = struct.unpack("<I", data[:4])
    header = json.loads(bytes(data[4:4 + length]))
    if header.get("format") != MAGIC:
        raise ValueError(f"not an {MAGIC} message (format {header.get('format')!r})")
    return header, memoryview(data)[4 + length:]


def _take(body: memoryview, offset: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    size = torch.empty(0, dtype=dtype).element_size() * count
    if offset + size > len(body):
        raise ValueError("a message cut short")
    raw = torch.frombuffer(bytearray(body[offset:offset + size]), dtype=torch.int16 if dtype == torch.bfloat16
                           else dtype) if count else torch.empty(0, dtype=dtype)
    return (raw.view(torch.bfloat16) if dtype == torch.bfloat16 else raw), offset + size


def pack_request(sequences: list[tuple[list[int], int, int]], k: int, dtype: str = "float32") -> bytes:
    """`sequences`: (token ids, first scored position, positions scored)."""
    ids = torch.tensor([t for ids, _, _ in sequences for t in ids], dtype=torch.int32)
    return _message({"k": k, "dtype": dtype, "sequences": [[len(ids_), start, count]
                                                           for ids_, start, count in sequences]}, ids)


def unpack_request(data: bytes) -> tuple[int, str, list[tuple[list[int], int, int]]]:
    header, body = _split(data)
    total = sum(length for length, _, _ in header["sequences"])
    ids, _ = _take(body, 0, total, torch.int32)
    flat, sequences, at = ids.tolist(), [], 0
    for length, start, count in header["sequences"]:
        if not 1 <= start or start + count > length:
            raise ValueError(f"scored positions {start}..{start + count - 1} outside a sequence of {length}")
        sequences.append((flat[at:at + length], start, count))
        at += length
    if header["dtype"] not in DTYPES:
        raise ValueError(f"dtype {header['dtype']!r}: float32 or bfloat16")
    return int(header["k"]), header["dtype"], sequences


def pack_scores(scores: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int, dtype: str = "float32") -> bytes:
    """Per sequence: (sampled-token log-prob [count], top-K ids [count, K], top-K log-probs [count, K])."""
    cast = DTYPES[dtype]
    token = torch.cat([s[0] for s in scores]) if scores else torch.empty(0)
    ids = torch.cat([s[1] for s in scores]) if scores else torch.empty(0, k, dtype=torch.long)
    logp = torch.cat([s[2] for s in scores]) if scores else torch.empty(0, k)
    return _message({"k": k, "dtype": dtype, "counts": [len(s[0]) for s in scores]}, token.to(cast),
                    ids.to(torch.int32), logp.to(cast))


def unpack_scores(data: bytes) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    header, body = _split(data)
    k, dtype, counts = int(header["k"]), DTYPES[header["dtype"]], header["counts"]
    total = sum(counts)
    token, at = _take(body, 0, total, dtype)
    ids, at = _take(body, at, total * k, torch.int32)
    logp, _ = _take(body, at, total * k, dtype)
    token, ids, logp = token.float(), ids.long().view(total, k), logp.float().view(total, k)
    found, start = [], 0
    for count in counts:
        found.append((token[start:start + count], ids[start:start + count], logp[start:start + count]))
        start += count
    return found


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of what decides the token ids: the vocabulary, the special tokens and the end-of-sequence."""
    described = [sorted(tokenizer.get_vocab().items()), sorted(map(str, tokenizer.all_special_tokens)),
                 tokenizer.eos_token_id, len(tokenizer)]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]
